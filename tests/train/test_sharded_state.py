"""Sharded training state in train.py under torchrun (gloo, 2 processes): --zero (ZeRO-1
optimizer state) and --fsdp (FSDP2) on a DDP build, each against the unsharded run's
per-step losses, and each stopped mid-run and resumed against the uninterrupted run;
DDP's checkpoint under EP2 is refused in one line. (ZeRO under EP2 x DP2, where the
data-parallel group it shards over is not the world, is tests/distributed's.)"""
import shutil

import pytest
import torch
from safetensors.torch import load_file

from moec.runtime.training.progress import read_metrics
from tests.train.conftest import run_train

STEPS = 6
ARGS = ("--steps", STEPS, "--ckpt-every", 3, "--log-every", 1, "--eval-every", 0)
STOP_AT = 5  # a NaN loss at step 5 stops the run after step 4; the newest checkpoint is step 3


@pytest.fixture(scope="module")
def builds(moe_build, ep2_build):
    return {"ddp": moe_build, "ep2": ep2_build}


@pytest.fixture(scope="module")
def trained(builds, tmp_path_factory):
    """trained(build, *flags): the run dir of an uninterrupted 2-process run, made once per module."""
    done = {}

    def run(build, *flags):
        if (build, flags) not in done:
            run_dir = tmp_path_factory.mktemp(build)
            r = run_train(builds[build], *ARGS, *flags, run_dir=run_dir, nproc=2, timeout=240)
            assert r.returncode == 0, r.stderr[-3000:]
            done[build, flags] = run_dir
        return done[build, flags]
    return run


def _losses(run_dir) -> list[tuple]:
    """(kind, step, loss): every step's training loss (global batch) and the final validation loss."""
    records = read_metrics(run_dir / "metrics.jsonl")
    return [(x["kind"], x["step"], x["loss"] if x["kind"] == "train" else x["val_loss"])
            for x in records if x["kind"] in ("train", "val")]


def _close(got, want):
    assert [x[:2] for x in got] == [x[:2] for x in want]
    for (kind, step, a), (_, _, b) in zip(got, want):
        assert abs(a - b) <= 1e-5 * abs(b), f"{kind} loss at step {step}: {a} vs {b}"


def test_zero_matches_unsharded(trained):
    _close(_losses(trained("ddp", "--zero")), _losses(trained("ddp")))
    extra = trained("ddp", "--zero") / "checkpoints" / f"step_{STEPS:08d}" / "extra_rank1.pt"
    assert torch.load(extra, weights_only=True)["layout"] == "by_name"  # the sharded optimizer's layout


def test_fsdp_matches_ddp(trained):
    _close(_losses(trained("ddp", "--fsdp")), _losses(trained("ddp")))


@pytest.mark.parametrize("flag", ["--zero", "--fsdp"])
def test_stopped_run_resumes_exactly(builds, trained, flag, tmp_path):
    r = run_train(builds["ddp"], *ARGS, flag, "--debug-nan-at-step", STOP_AT, run_dir=tmp_path, nproc=2, timeout=240)
    assert r.returncode != 0 and f"loss is not finite at step {STOP_AT}" in r.stderr, r.stderr[-3000:]
    r = run_train(builds["ddp"], *ARGS, flag, "--resume", run_dir=tmp_path, nproc=2, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    reference = trained("ddp", flag)
    assert _losses(tmp_path) == _losses(reference)  # bitwise, the stopped run's step 4 counted once
    ours, theirs = load_file(str(tmp_path / "final.safetensors")), load_file(str(reference / "final.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _resume_from_step_3(build, source, tmp_path, *flags):
    shutil.copytree(source / "checkpoints" / "step_00000003", tmp_path / "checkpoints" / "step_00000003")
    return run_train(build, *ARGS, *flags, "--resume", run_dir=tmp_path, nproc=2, timeout=240)


def test_zero_checkpoint_resumes_without_zero(builds, trained, tmp_path):
    # the optimizer state is saved under parameter names, so an unsharded run reads all of it
    r = _resume_from_step_3(builds["ddp"], trained("ddp", "--zero"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _close(_losses(tmp_path), [x for x in _losses(trained("ddp")) if x[1] > 3])


def test_zero_refuses_a_whole_optimizer_state(builds, trained, tmp_path):
    r = _resume_from_step_3(builds["ddp"], trained("ddp"), tmp_path, "--zero")
    assert r.returncode != 0
    assert "holds a whole optimizer state (written without --zero): resume it without --zero" in r.stderr


def test_a_whole_state_checkpoint_is_refused_under_ep_in_one_line(builds, trained, tmp_path):
    """DDP's checkpoint (torch's layout of the whole model and optimizer state) under EP2, a plan change that
    cannot reshard it: refused before any step, one line a rank."""
    r = _resume_from_step_3(builds["ep2"], trained("ddp"), tmp_path)
    message = (f"error: checkpoint {tmp_path / 'checkpoints' / 'step_00000003'} holds the whole state of a run "
               f"without EP, PP or TP (one process, DDP or FSDP), which a run of this plan cannot reshard: resume "
               f"it on one process with this build first, whose checkpoints resume under any plan")
    assert r.returncode != 0
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [message] * 2, r.stderr[-3000:]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_zero_with_fsdp_is_one_line_exit_2(moe_build, tmp_path):
    r = run_train(moe_build, "--steps", 1, "--zero", "--fsdp", run_dir=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: --zero shards the optimizer state, which --fsdp (FSDP2) already "
                                             "shards along with the parameters and gradients: use one of them"]


def test_fsdp_on_an_expert_parallel_build_is_one_line_exit_2(ep2_build, tmp_path):
    r = run_train(ep2_build, "--steps", 1, "--fsdp", run_dir=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: --fsdp shards a data-parallel build, and this build is expert "
                                             "parallel (EP=2): its experts are sharded over the ranks already; use "
                                             "--zero to shard the optimizer state too"]
