import operator
import subprocess
import sys

import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import moec
from moec.codegen import source
from moec.passes.lower_to_triton import LowerToTriton
from tests.models import run

ops = torch.ops.moec


def _routing_graph(k, capacity, score, bias):
    """x [T, D], logits [T, E] -> unpermute(permute(x) * 2): the op sequence lower_moe emits, by hand."""
    g = torch.fx.Graph()
    x, logits = g.placeholder("x"), g.placeholder("logits")
    b = g.placeholder("bias") if bias else None
    gate = g.call_function(ops.gate.default, (logits, k, score, True, b, 1, 1))
    weights, indices = (g.call_function(operator.getitem, (gate, i)) for i in range(2))
    route = g.call_function(ops.route.default, (indices, logits_E := 6, capacity))
    row_map = g.call_function(operator.getitem, (route, 0))
    y = g.call_function(ops.permute.default, (x, row_map, k))
    y = g.call_function(torch.mul, (y, 2.0))
    out = g.call_function(ops.unpermute.default, (y, row_map, weights))
    g.output((out, g.call_function(operator.getitem, (gate, 3)), g.call_function(operator.getitem, (route, 1))))
    assert logits_E == 6
    return torch.fx.GraphModule(torch.nn.Module(), g)


def test_lowering_swaps_ops_keeps_outputs_and_records_importable_sources(tmp_path):
    for k, capacity, score, bias in [(2, 0, "softmax", False), (3, 4, "sigmoid", True)]:
        gm = _routing_graph(k, capacity, score, bias)
        inputs = [torch.randn(11, 8), torch.randn(11, 6)] + ([torch.randn(6)] if bias else [])
        FakeTensorProp(gm).propagate(*inputs)
        before = gm(*inputs)
        vals = {n.name: n.meta["val"] for n in gm.graph.nodes if "val" in n.meta}
        result = run(gm, LowerToTriton())
        gm.graph.lint()
        assert result.modified
        targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        assert not any(t.startswith("moec.") for t in targets)
        assert sum(t.startswith("moec_kernels.") for t in targets) == 4
        assert all(n.meta["val"] is vals[n.name] for n in gm.graph.nodes if n.name in vals)
        after = gm(*inputs)
        for a, b in zip(before, after):
            assert torch.equal(a, b)
        names = sorted(gm.meta["kernels"])
        assert any(n.startswith("permute_") and n.endswith("_drop") for n in names) == (capacity > 0)
        source.write(tmp_path / f"build{k}", gm.meta["kernels"])
        # the emitted program loads them through the runtime alone
        code = "; ".join(["from moec.runtime import load_kernels", f"load_kernels('.', {names!r})"] +
                         [f"assert hasattr(torch.ops.moec_kernels, {n!r})" for n in names])
        subprocess.run([sys.executable, "-c", f"import torch; {code}"], cwd=tmp_path / f"build{k}", check=True)


def test_runtime_capacity_keeps_the_reference_route():
    gm = _routing_graph(2, 0, "softmax", False)
    route = next(n for n in gm.graph.nodes if n.target is ops.route.default)
    with gm.graph.inserting_before(route):
        cap = gm.graph.call_function(operator.floordiv, (7, 2))
    route.args = (route.args[0], route.args[1], cap)
    gm.recompile()
    inputs = [torch.randn(9, 8), torch.randn(9, 6)]  # 18 slots over 6 experts: some overflow 3
    FakeTensorProp(gm).propagate(*inputs)
    before = gm(*inputs)
    run(gm, LowerToTriton())
    assert route.target is ops.route.default
    assert any(n.endswith("_drop") for n in gm.meta["kernels"])
    assert all(torch.equal(a, b) for a, b in zip(before, gm(*inputs)))


def test_options_choose_the_ops():
    gm = _routing_graph(2, 0, "softmax", False)
    FakeTensorProp(gm).propagate(torch.randn(4, 8), torch.randn(4, 6))
    run(gm, LowerToTriton(("permute",)))
    assert [n.split("_")[0] for n in gm.meta["kernels"]] == ["permute"]
    try:
        LowerToTriton(("experts",))
    except moec.MoecError as e:
        assert "lower_to_triton" in str(e)
    else:
        raise AssertionError("an unknown op must be a user error")
