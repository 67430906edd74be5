"""train.py under torchrun (DDP over gloo, 2 processes), and `moec plot` of its run."""
import json
import struct

from click.testing import CliRunner

from moec.driver.cli import main
from moec.runtime.training.plot import plot_run
from moec.runtime.training.progress import read_metrics
from tests.train.conftest import run_train


def test_torchrun_ddp_then_plot(moe_build, tmp_path):
    run = tmp_path / "run"
    r = run_train(moe_build, "--steps", 4, "--log-every", 2, "--ckpt-every", 2, "--eval-every", 2, run_dir=run,
                  nproc=2, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    records = read_metrics(run / "metrics.jsonl")
    train = [x for x in records if x["kind"] == "train"]
    assert [x["step"] for x in train] == [2, 4]
    assert all(layer["mean"] == 64 for x in train for layer in x["expert_load"])  # per rank, summed over 2
    ckpt = run / "checkpoints" / "step_00000004"
    assert (ckpt / "extra_rank0.pt").is_file() and (ckpt / "extra_rank1.pt").is_file()
    out = CliRunner().invoke(main, ["plot", str(run)])
    assert out.exit_code == 0, out.output
    png = run / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_of_a_non_run_dir_is_one_line_exit_2(tmp_path):
    out = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert out.exit_code == 2 and "no metrics.jsonl" in out.output


def _png_width(path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]  # IHDR's width


def test_plot_draws_a_load_heat_map_beside_the_curves(tmp_path):
    def record(step, layers):
        return {"kind": "train", "step": step, "lm_loss": 3.0, "expert_load": layers}

    layer = lambda cv: {"max": 10.0, "mean": 8.0, "cv": cv, "dropped": 0.0}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record(s, [layer(0.1), layer(0.9)])) + "\n"
                                                    for s in (1, 2, 3)))
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "metrics.jsonl").write_text(json.dumps(record(1, [])) + "\n")
    # 5.5 inches a panel at 100 dpi: the loss panel alone, or loss, load curves and the heat map
    assert _png_width(plot_run(dense, tmp_path / "dense.png")) == 550
    assert _png_width(plot_run(tmp_path, tmp_path / "moe.png")) == 3 * 550
