"""The emitted train.py end to end: loss goes down, metrics, export, bad input, NaN stop."""
import json
import re
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from moec.base.options import Options
from moec.driver.capture import capture
from moec.driver.compiler import compile_model
from moec.driver.model_shape import context_length
from moec.runtime.training.metrics import expert_load, load_summary
from moec.runtime.training.progress import read_metrics
from tests.train.conftest import ROOT, TINY, run_train


def test_trains_and_reports(moe_build, tmp_path):
    run = tmp_path / "run"
    r = run_train(moe_build, "--steps", 30, "--log-every", 5, "--eval-every", 10, "--ckpt-every", 0,
                  "--lr", 3e-3, run_dir=run)
    assert r.returncode == 0, r.stderr
    records = read_metrics(run / "metrics.jsonl")
    train = [x for x in records if x["kind"] == "train"]
    val = [x for x in records if x["kind"] == "val"]
    assert [x["step"] for x in train] == [5, 10, 15, 20, 25, 30]
    assert [x["step"] for x in val] == [10, 20, 30]
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 0.3
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    for x in train:
        assert x["loss"] == x["lm_loss"] + x["aux_loss"] + x["z_loss"]
        assert x["aux_loss"] > 0 and x["z_loss"] > 0 and x["tokens_per_s"] > 0 and x["mfu"] is None
        assert x["peak_memory_gib"] is None  # CUDA only
        assert len(x["expert_load"]) == 2  # one per MoE layer
        for layer in x["expert_load"]:
            # 4 x 32 tokens, top-2, 4 experts: 64 slots per expert on average
            assert layer["mean"] == 64 and 64 <= layer["max"] <= 128
            # capacity ceil(1.25 * 128 * 2 / 4) = 80 slots: at least the busiest expert's excess is dropped
            assert max(0, layer["max"] - 80) / 256 <= layer["dropped"] < 1
            assert 0 <= layer["cv"] <= 3 ** 0.5  # 4 experts: sqrt(E - 1) when one takes every slot
    assert "expert load max/mean" in r.stderr and " cv " in r.stderr and "validation loss" in r.stderr
    # the export loads into the build's model under its own parameter and buffer names
    exported = load_file(str(run / "final.safetensors"))
    result = json.loads((moe_build / "config.json").read_text())["result"]
    biases = result["router_biases"]
    assert len(biases) == 2 and all(exported[n].shape == (4,) for n in biases)  # aux-loss-free balancing's state
    assert sum(t.numel() for n, t in exported.items() if n not in biases) == result["params"]
    assert (run / "checkpoints" / "step_00000030").is_dir()


def test_load_summary_of_each_layer():
    counts = [torch.tensor([100, 20, 8, 0], dtype=torch.int32), torch.tensor([8, 8], dtype=torch.int32)]
    row, even = load_summary(expert_load(counts, 64, 2, 1.25), [4, 2], 1)  # capacity ceil(1.25 * 128 / 4) = 40
    assert row == pytest.approx({"max": 100.0, "mean": 32.0, "cv": statistics.pstdev([100, 20, 8, 0]) / 32,
                                 "dropped": 60 / 128})
    assert even["cv"] == 0 and even["max"] == even["mean"] == 8
    assert load_summary(expert_load(counts, 64, 2, 0.0), [4, 2], 1)[0]["dropped"] == 0
    summed = expert_load(counts, 64, 2, 0.0) * 2  # two ranks that routed alike: per rank, the same
    assert load_summary(summed, [4, 2], 2)[0] == load_summary(expert_load(counts, 64, 2, 0.0), [4, 2], 1)[0]


def test_bad_data_path_is_one_line_exit_2(moe_build, tmp_path):
    r = run_train(moe_build, "--steps", 2, "--data", tmp_path / "missing.txt", run_dir=tmp_path / "run")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: --data {tmp_path / 'missing.txt'}: no such file"]


def test_bin_of_wrong_dtype_is_refused(moe_build, tmp_path):
    data = tmp_path / "tokens.bin"
    data.write_bytes(bytes(range(200)) * 10 + b"\x01\x02")  # 2002 bytes: uint16 fits, uint32 does not
    r = run_train(moe_build, "--steps", 2, "--data", data, "--data-dtype", "uint32", run_dir=tmp_path / "run")
    assert r.returncode == 2 and "not a whole number of uint32" in r.stderr
    r = run_train(moe_build, "--steps", 2, "--data", data, "--data-dtype", "uint16", run_dir=tmp_path / "run")
    assert r.returncode == 2 and "vocabulary is 256" in r.stderr  # uint16 pairs of bytes exceed 255


def test_nan_loss_stops_and_keeps_last_checkpoint(moe_build, tmp_path):
    run = tmp_path / "run"
    r = run_train(moe_build, "--steps", 20, "--ckpt-every", 4, "--log-every", 1, "--debug-nan-at-step", 6,
                  run_dir=run)
    assert r.returncode == 2
    assert "loss is not finite at step 6" in r.stderr and "--resume-from 4" in r.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004"]
    assert max(x["step"] for x in read_metrics(run / "metrics.jsonl")) == 5
    assert not (run / "final.safetensors").exists()


def test_grad_accum_splits_the_step_batch(tmp_path):
    """--grad-accum 2 --batch-size 2 sees the same 4 sequences per step as --batch-size 4 and, on a dense
    model (no per-micro-batch aux loss), takes the same steps: equal losses up to summation order."""
    build = tmp_path / "dense"
    compile_model(str(ROOT / "examples" / "gpt.py"), str(build), Options(overrides=TINY, dense=True, verify=False),
                  log=lambda *a: None)
    losses = {}
    for name, args in {"accum": ("--batch-size", 2, "--grad-accum", 2), "whole": ("--batch-size", 4)}.items():
        r = run_train(build, "--steps", 6, "--log-every", 1, "--eval-every", 0, "--ckpt-every", -1, "--lr", 3e-3,
                      *args, run_dir=tmp_path / name)
        assert r.returncode == 0, r.stderr
        assert not (tmp_path / name / "checkpoints").exists()  # --ckpt-every -1: none
        losses[name] = [x["lm_loss"] for x in read_metrics(tmp_path / name / "metrics.jsonl") if x["kind"] == "train"]
    assert len(losses["accum"]) == 6
    for a, w in zip(losses["accum"], losses["whole"]):
        assert abs(a - w) <= 1e-5 * abs(w), (losses["accum"], losses["whole"])
    assert losses["accum"][-1] < losses["accum"][0]


def test_build_without_weights_is_one_line_exit_2(tmp_path):
    build = tmp_path / "no-weights"
    compile_model(str(ROOT / "examples" / "gpt.py"), str(build),
                  Options(overrides=TINY, dense=True, verify=False, max_weights_gb=1e-6), log=lambda *a: None)
    assert not (build / "weights.safetensors").exists()
    r = run_train(build, "--steps", 2, run_dir=tmp_path / "run")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--max-weights-gb" in r.stderr, r.stderr


def test_seq_len_defaults_to_and_stops_at_the_models_context(moe_build, tmp_path):
    # TINY's block_size is 64 positions: the default is cut to it, and a longer --seq-len is refused
    help_text = subprocess.run([sys.executable, str(moe_build / "train.py"), "--help"], capture_output=True,
                               text=True).stdout
    assert re.search(r"--seq-len SEQ_LEN\s+tokens per sequence[^(]*\(default: (\d+)\)", help_text).group(1) == "64"
    r = run_train(moe_build, "--steps", 1, "--seq-len", 65, run_dir=tmp_path / "run")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --seq-len 65 is longer than the model's context of 64 tokens; pass --seq-len 64 or less"]
    assert not (tmp_path / "run").exists()


def test_context_is_read_from_the_position_table_when_no_config_says_it():
    class Positions(nn.Module):  # no config attribute: only the 48-row position table bounds the length
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(100, 16), nn.Embedding(48, 16), nn.Linear(16, 100)

        def forward(self, ids):
            return self.head(self.tok(ids) + self.pos(torch.arange(ids.shape[1])))

    model = Positions()
    assert context_length(capture(model, (torch.zeros(2, 8, dtype=torch.long),)), model) == 48


def test_under_sequence_parallelism_the_flops_of_all_but_the_whole_token_parameters_divide_by_tp():
    """A TP rank computes 1/TP of the split linears; under sequence parallelism also of what runs on its token
    share (norms, routers, experts): only the embedding and head compute on every token."""
    from moec.runtime.training.metrics import step_flops, whole_token_params

    class Model(torch.nn.Module):
        def __init__(self, device="cpu"):
            super().__init__()
            self.wte, self.ln, self.proj = (torch.nn.Linear(4, 8, bias=False, device=device),
                                            torch.nn.LayerNorm(8, device=device),
                                            torch.nn.Linear(8, 8, device=device))

    plan = {"proj.weight": {"style": "colwise", "parts": 1, "bias": "proj.bias"},
            "ln.weight": {"style": "sequence", "parts": 1, "bias": None},
            "ln.bias": {"style": "sequence", "parts": 1, "bias": None}}
    assert whole_token_params(Model, plan) == 32  # wte
    active = 32 + 16 + 72
    assert step_flops(active, 10, 0.0, 2, active - 32) == 6.0 * (32 + 88 / 2) * 10
