"""The pass manager's contract: required facts, failures named with the passes before, provenance on every
node a pass creates, analyses' findings in the IR dump, and --stop-after."""
import json
from pathlib import Path

import pytest
import torch

from moec.base.options import Options
from moec.driver.compiler import compile_model
from moec.driver.pipeline import PIPELINE, PassFailed, passes_for, run_pass, run_pipeline
from moec.passes.base import Pass, PassResult
from moec.passes.ffn_to_moe import FFNToMoE
from moec.passes.find_ffn import FindFFN
from tests.models import captured

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32)


class Breaks(Pass):
    name = "breaks"

    def __call__(self, gm):
        raise ValueError("boom")


class Orphan(Pass):
    name = "orphan"

    def __call__(self, gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        with gm.graph.inserting_before(out):
            gm.graph.call_function(torch.ops.aten.relu.default, (x,))
        return PassResult(gm, True)


def test_a_missing_fact_names_the_pass_and_what_it_needs():
    _, _, gm = captured("swiglu")
    with pytest.raises(PassFailed, match=r"ffn_to_moe requires ffns .*passes so far: none"):
        run_pass(gm, FFNToMoE(Options()), [])


def test_a_crash_names_the_pass_and_the_passes_before():
    _, _, gm = captured("swiglu")
    with pytest.raises(PassFailed, match=r"pass breaks \(after find_ffn, ffn_to_moe\) failed: ValueError: boom"):
        run_pass(gm, Breaks(), ["find_ffn", "ffn_to_moe"])


def test_nodes_without_provenance_are_refused():
    _, _, gm = captured("swiglu")
    with pytest.raises(PassFailed, match="orphan created nodes without provenance"):
        run_pass(gm, Orphan(), [])


def test_created_nodes_carry_the_module_they_replace():
    _, _, gm = captured("swiglu")
    gm, _ = run_pipeline(gm, [FindFFN(), FFNToMoE(Options(experts=4, topk=2))])
    moe = [n for n in gm.graph.nodes if n.op == "call_function" and "moe_layer" in str(n.target)]
    assert len(moe) == 2
    for n in moe:
        paths = [path for path, _ in n.meta["nn_module_stack"].values()]
        assert paths[-1].startswith("blocks.") and n.meta.get("stack_trace")


def test_stop_after_writes_the_dumps_up_to_that_pass_only(tmp_path):
    out = tmp_path / "b"
    compile_model(str(ROOT / "examples" / "gpt.py"), str(out), Options(experts=4, topk=2, overrides=TINY),
                  stop_after="ffn_to_moe", log=lambda s: None)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "ir"]
    dumps = sorted(p.name for p in (out / "ir").glob("*.py"))
    assert dumps == ["00_capture.py", "01_find_ffn.py", "02_sample_ffn_inputs.py", "03_ffn_to_moe.py"]
    header = (out / "ir" / "01_find_ffn.py").read_text().split("\n\n")[0]
    assert "2 dense FFN blocks" in header and "h.0.mlp: plain gelu_tanh, D=32 F=128" in header and "h.1.mlp" in header
    assert json.loads((out / "config.json").read_text())["result"]["stopped_after"] == "ffn_to_moe"


def test_the_pipeline_is_a_list_of_names():
    names = [p.name for p in passes_for(Options(ep=2, tp=2))]
    assert names == [n for n in PIPELINE if n != "plan_sharding"]
    assert "tensor_parallel" not in [p.name for p in passes_for(Options(ep=2))]
    assert [p.name for p in passes_for(Options(), stop_after="lower_moe")] == ["find_ffn", "sample_ffn_inputs",
                                                                              "ffn_to_moe", "lower_moe"]
    assert [p.name for p in passes_for(Options(router_init="random"), stop_after="ffn_to_moe")] == ["find_ffn",
                                                                                                  "ffn_to_moe"]
