"""The pass on a captured tiny Llama: where it puts the collectives, what the IR shows, its errors."""
import pytest
import torch

from moec.base.errors import MoecError
from moec.driver.capture import build, capture, example_inputs, load_module
from moec.base.options import Options
from moec.driver.pipeline import passes_for, readable, run_pipeline
from moec.runtime.upcycle import upcycle_graph
from tests.distributed.builds import ROOT, TINY

ops = torch.ops.moec


@pytest.fixture(scope="module")
def tiny():
    mod = load_module(str(ROOT / "examples" / "llama.py"))
    torch.manual_seed(0)
    model = build(mod, "build_model", None, TINY, "cpu")
    return model, example_inputs(mod, model, 2, 8)


def _compile(tiny, experts=8, **parallel):
    model, inputs = tiny
    options = Options(experts=experts, topk=2, **parallel).validate()
    return upcycle_graph(run_pipeline(capture(model, inputs), passes_for(options))[0])  # the experts, as loaded


def test_dispatch_before_and_combine_after_every_experts_node(tiny):
    gm = _compile(tiny, ep=4)
    gm.graph.lint()
    experts = [n for n in gm.graph.nodes if n.target is ops.experts.default]
    assert len(experts) == TINY["n_layers"]
    for n in experts:
        assert n.args[0].args[0].target is ops.dispatch.default
        (user,) = n.users
        assert user.target is ops.combine.default
        assert n.args[2].meta["val"].shape[0] == 8 // 4  # a rank's view of its experts
    # lower_to_triton still found the routing ops around the collectives
    assert any(str(n.target).startswith("moec_kernels") for n in gm.graph.nodes)


def test_ir_shows_group_and_bytes(tiny):
    gm = _compile(tiny, ep=4)
    d = next(n for n in gm.graph.nodes if n.target is ops.dispatch.default)
    rows, D = d.args[0].meta["val"].shape  # rows: the symbolic token count times k
    volume = rows * D * 4 * 3 // 4  # fp32 rows, 3 of 4 ranks remote
    volume = volume if isinstance(volume, int) else str(volume)  # bytes as a formula in batch and sequence
    assert d.meta["comm"] == {"group": "ep", "ep": 4, "node_size": 0, "bytes": volume}
    text = readable(gm)
    assert f"'group': 'ep', 'ep': 4, 'node_size': 0, 'bytes': {volume!r}" in text
    assert "'group': 'data'" in text and "moec.balance_counts" in text


def test_one_process_computes_what_the_model_without_ep_computes(tiny):
    model, inputs = tiny
    want = _compile(tiny)(*inputs)
    got = _compile(tiny, ep=2)(*inputs)
    for k in ("logits", "aux_loss", "z_loss"):
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_errors(tiny):
    with pytest.raises(MoecError, match="not divisible by EP=3"):
        _compile(tiny, ep=3)
    with pytest.raises(MoecError, match="needs --node-size"):
        Options(ep=4, ep_variant="hierarchical").validate()
    with pytest.raises(MoecError, match="--ep-variant"):
        Options(ep=4, ep_variant="ring").validate()
    with pytest.raises(MoecError, match="--ep-variant, --node-size mean something only with expert parallelism"):
        Options(ep_variant="rbd", node_size=2).validate()
