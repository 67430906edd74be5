"""train.py under torchrun (DDP over gloo, 2 processes), and `moec plot` of its run."""
from click.testing import CliRunner

from moec.driver.cli import main
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
