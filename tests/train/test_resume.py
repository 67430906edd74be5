"""Checkpoints: a run killed with SIGKILL and resumed ends bitwise where an
uninterrupted run ends; damaged checkpoints are skipped; SIGTERM saves first."""
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from moec.runtime.training.checkpoint import verify
from moec.runtime.training.progress import read_metrics
from tests.train.conftest import run_train

STEPS = 16
ARGS = ("--steps", STEPS, "--ckpt-every", 4, "--log-every", 1, "--eval-every", 8)


@pytest.fixture(scope="module")
def reference(moe_build, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    r = run_train(moe_build, *ARGS, run_dir=run)
    assert r.returncode == 0, r.stderr
    return run


def _wait_for(path, proc, timeout=90):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.02)


def _same_end(run, reference):
    def last(r):
        return [{k: v for k, v in x.items() if k not in ("tokens_per_s", "mfu")}
                for x in read_metrics(r / "metrics.jsonl") if x["kind"] == "train" and x["step"] == STEPS]
    assert last(run) == last(reference)  # every logged number but timings, bitwise, once
    ours, theirs = load_file(str(run / "final.safetensors")), load_file(str(reference / "final.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_sigkill_then_resume_is_bitwise(moe_build, reference, tmp_path):
    proc = run_train(moe_build, *ARGS, run_dir=tmp_path, background=True)
    _wait_for(tmp_path / "checkpoints" / "step_00000004", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "final.safetensors").exists()
    r = run_train(moe_build, *ARGS, "--resume", run_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    _same_end(tmp_path, reference)
    steps = [x["step"] for x in read_metrics(tmp_path / "metrics.jsonl") if x["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))  # the killed run's tail is not counted twice


def test_damaged_checkpoint_falls_back(moe_build, reference, tmp_path):
    r = run_train(moe_build, *ARGS, run_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000008", "step_00000012", "step_00000016"]
    shard = next((ckpts / "step_00000016").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    shard.write_bytes(bytes(data))
    (ckpts / "step_00000012" / "manifest.json").unlink()  # as if the save never finished
    assert "checksum" in verify(ckpts / "step_00000016") and "manifest" in verify(ckpts / "step_00000012")
    assert verify(ckpts / "step_00000008") is None
    (tmp_path / "final.safetensors").unlink()
    r = run_train(moe_build, *ARGS, "--resume", run_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "step_00000016 is damaged or incomplete" in r.stderr and "step_00000012 is damaged" in r.stderr
    _same_end(tmp_path, reference)


def test_sigterm_saves_a_checkpoint(moe_build, tmp_path):
    proc = run_train(moe_build, "--steps", 400, "--ckpt-every", 0, "--log-every", 1, run_dir=tmp_path,
                     background=True)
    _wait_for(tmp_path / "metrics.jsonl", proc)
    while not (tmp_path / "metrics.jsonl").read_text():
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err
    (saved,) = (tmp_path / "checkpoints").iterdir()
    assert verify(saved) is None and 0 < int(saved.name.removeprefix("step_")) < 400


def test_resume_with_fewer_steps_than_done_is_refused_and_keeps_the_run(moe_build, tmp_path):
    run = tmp_path / "run"
    assert run_train(moe_build, "--steps", 4, "--ckpt-every", 2, "--eval-every", 0, run_dir=run).returncode == 0
    final = (run / "final.safetensors").read_bytes()
    r = run_train(moe_build, "--steps", 2, "--resume", "--eval-every", 0, run_dir=run)
    assert r.returncode == 2 and "--resume: the run is at step 4 already and --steps is 2" in r.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == \
        ["step_00000002", "step_00000004"]  # no checkpoint named for a step it does not hold
    assert (run / "final.safetensors").read_bytes() == final
