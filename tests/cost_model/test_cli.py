"""`moec plan` and `moec calibrate` as click commands."""
import json

import pytest
import torch
from click.testing import CliRunner

from moec.cost_model.cli import known_or_json_shape, plan, plan_command
from moec.driver.calibrate import calibrate
from moec.cost_model.hardware import load_hardware
from moec.cost_model.planner import best_plan
from moec.base.options import Options
from moec.cost_model.shape import ModelShape

TINY = ModelShape(layers=4, hidden=256, ffn=1024, vocab=1000, heads=4, kv_heads=4, gated=False,
                  tied_embeddings=True, seq_len=128, name="tiny")


def test_plan_prints_table_explains_and_writes_plan_json(tmp_path):
    result = CliRunner().invoke(plan, ["Mixtral-8x7B", "--gpus", "64", "--hardware", "dgx_h100", "--top", "3",
                                       "--explain", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "params+opt GiB" in result.output and "best: EP" in result.output
    assert "kappa passes over the" in result.output  # the legend under the table
    assert "Memory per GPU" in result.output and "P_d" in result.output and "GiB" in result.output
    record = json.loads((tmp_path / "plan.json").read_text())
    assert record["chosen"]["gpus"] == 64 and record["model"]["name"] == "Mixtral-8x7B"


def test_plan_command_takes_a_shape_provider():
    seen = []

    def provider(model, config, seq_len):
        seen.append((model, config, seq_len))
        return TINY

    cmd = plan_command(provider)
    result = CliRunner().invoke(cmd, ["model.py", "--config", "tiny", "--seq-len", "128", "--experts", "8",
                                      "--topk", "2", "--gpus", "8", "--hardware", "mi300x", "--explain", "--latex"])
    assert result.exit_code == 0, result.output
    assert seen == [("model.py", "tiny", 128)]
    assert "\\frac" in result.output


def test_plan_unknown_model_is_a_one_line_error():
    result = CliRunner().invoke(plan, ["nothing.py", "--gpus", "8", "--experts", "8", "--topk", "2"])
    assert result.exit_code != 0
    assert "cannot read model dimensions" in str(result.exception)


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="collectives need 2 processes, one per GPU: one GPU here")
def test_calibrate_writes_a_profile_the_planner_takes(tmp_path):
    out = tmp_path / "here.json"
    procs = torch.cuda.device_count() or 2  # one process per GPU; gloo on CPUs
    result = CliRunner().invoke(calibrate, ["-o", str(out), "--sizes", "4096,65536", "--procs", str(procs),
                                            "--gemm-dim", "128"])
    assert result.exit_code == 0, result.output
    hw = load_hardware(str(out))
    measured = hw.raw["measured"]
    assert measured["processes"] == procs and set(measured["all_to_all"]["seconds_by_bytes"]) == {"4096", "65536"}
    assert hw.peak_flops > 0 and hw.gpus_per_node == 2 and hw.latency_intra >= 0
    p = best_plan(TINY, Options(experts=8, topk=2), 2, str(out), global_batch=8)
    assert p.hardware == hw.name and p.step_time_s > 0


def test_json_shape_and_seq_len_override(tmp_path):
    path = tmp_path / "shape.json"
    path.write_text(json.dumps({**TINY.__dict__, "moe_layers": [False, True, False, True]}))
    shape = known_or_json_shape(str(path), None, 64)
    assert shape.seq_len == 64 and shape.moe_layers == (False, True, False, True)
