"""The torch.fx.symbolic_trace front-end: what export rejects, captured to the same IR."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moec.driver.capture import build, capture, load_module
from moec.passes.find_ffn import FindFFN
from tests.models import run as run_pass
from tests.test_cli import load_build, run

MODEL = Path(__file__).resolve().parent / "fallback_model.py"


@pytest.fixture(scope="module")
def mod():
    return load_module(str(MODEL))


def test_export_rejects_the_model_and_symbolic_trace_captures_it(mod):
    model = build(mod, "build_model", None, {}, "meta")
    tokens = torch.zeros(2, 16, dtype=torch.long, device="meta")
    with pytest.raises(Exception):
        torch.export.export(model, (tokens,), strict=False)
    gm = capture(model, (tokens,))
    assert gm.meta["frontend"] == "torch.fx.symbolic_trace"
    assert gm.meta["opaque"] == ["moec_user_fallback_model:gate_positive", "torch.ops.moectest.rmsnorm.default"]
    tensors = [n for n in gm.graph.nodes if n.op in ("placeholder", "get_attr", "call_function")
               and n.target is not getattr and "sym_size" not in str(n.target)]
    assert all(isinstance(n.meta["val"], torch.Tensor) for n in tensors)
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"]
    assert all(isinstance(s, torch.SymInt) for s in ids.shape)  # batch and sequence stay symbolic
    ffns = run_pass(gm, FindFFN()).graph_module.meta["ffns"]
    assert [f.module for f in ffns] == ["blocks.0", "blocks.1"]
    assert [f.w1.name for f in ffns] == ["blocks.0.up.weight", "blocks.1.up.weight"]
    assert gm.get_parameter("head.weight") is gm.get_parameter("emb.weight")  # tied, as in the model


def test_captured_graph_computes_the_model_at_any_size_with_its_gradients(mod):
    torch.manual_seed(0)
    model = build(mod, "build_model", None, {}, "cpu")
    gm = capture(model, (torch.randint(0, 256, (2, 16)),))
    tokens = torch.randint(0, 256, (3, 21))
    want = model(tokens).logits
    got = gm(tokens)["logits"]
    assert torch.allclose(got, want, atol=1e-6)
    want.square().mean().backward()
    got.square().mean().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(gm.get_parameter(name).grad, p.grad, atol=1e-6), name


def test_opaque_call_that_fails_on_zeros_is_one_clear_line(tmp_path):
    source = MODEL.read_text().replace("if bool((scale > 0).all()):", "if bool((scale > 0).all()) or True:\n"
                                       "        assert x.abs().sum() > 0, 'needs a non-zero input'")
    (tmp_path / "m.py").write_text(source)
    r = run("compile", tmp_path / "m.py", "-o", tmp_path / "out", "--experts", "4", "--topk", "2")
    assert r.exit_code == 2
    last = r.output.strip().splitlines()[-1]
    assert "torch.fx.symbolic_trace: at `" in last and "fails on zeros (AssertionError: needs a non-zero input)" in last
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()


def test_fallback_build_verifies_runs_trains_and_is_deterministic(tmp_path):
    args = ["--experts", "4", "--topk", "2", "--shared-experts", "1"]
    for name in ("a", "b"):
        r = run("compile", MODEL, "-o", tmp_path / name, *args)
        assert r.exit_code == 0, r.output
    assert "via torch.fx.symbolic_trace" in r.output
    for f in sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    out = tmp_path / "a"
    assert (out / "source" / MODEL.name).read_text() == MODEL.read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["result"]["verify_max_rel_error"] < 1e-4 and config["result"]["moe_layers"] == 2
    result = load_build(out)(torch.randint(0, 256, (2, 12)))
    assert result["logits"].shape == (2, 12, 256) and len(result["expert_counts"]) == 2
    train = subprocess.run([sys.executable, out / "train.py", "--steps", "3", "--batch-size", "2", "--seq-len", "16",
                            "--run-dir", tmp_path / "run", "--ckpt-every", "-1", "--log-every", "1"], capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["lm_loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses), rows
