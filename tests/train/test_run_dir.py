"""A run dir holds one run: fresh starts in a used one are refused, resumes say where they start and apply
the flags they are given, flags that would crash or mislead later are one line at the start, and the NaN
stop points to a checkpoint from before the divergence."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from moec.runtime.training.divergence import LossGuard
from moec.runtime.training.flags import compiles
from moec.runtime.training.progress import read_metrics
from moec.runtime.training.schedule import warmup_cosine
from tests.train.conftest import run_train

BASE = ("--log-every", 1, "--eval-every", 0)


def _one_line_error(r) -> str:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def _train(r) -> list[dict]:
    return [x for x in read_metrics(r) if x["kind"] == "train"]


def test_a_fresh_start_in_a_used_run_dir_is_refused_and_the_old_run_kept(moe_build, tmp_path):
    run = tmp_path / "run"
    assert run_train(moe_build, "--steps", 4, "--ckpt-every", 2, "--keep", 1, *BASE, run_dir=run).returncode == 0
    before = (run / "metrics.jsonl").read_text()
    line = _one_line_error(run_train(moe_build, "--steps", 4, "--ckpt-every", 1, *BASE, run_dir=run))
    assert "holds a run already" in line and "--resume" in line and "--overwrite" in line
    assert (run / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004"]
    r = run_train(moe_build, "--steps", 3, "--ckpt-every", 1, "--keep", 5, "--overwrite", *BASE, run_dir=run)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{s:08d}" for s in (1, 2, 3)]
    assert [x["step"] for x in _train(run / "metrics.jsonl")] == [1, 2, 3]


def test_a_resume_says_where_it_starts_and_refuses_a_finished_run(moe_build, tmp_path):
    run = tmp_path / "run"
    r = run_train(moe_build, "--steps", 3, "--resume", *BASE, run_dir=run)
    assert r.returncode == 0 and "no usable checkpoint" in r.stderr and "starting at step 1" in r.stderr, r.stderr
    line = _one_line_error(run_train(moe_build, "--steps", 3, "--resume", *BASE, run_dir=run))
    assert "at step 3 already" in line and "--steps" in line
    r = run_train(moe_build, "--steps", 5, "--resume", *BASE, run_dir=run)
    assert r.returncode == 0 and "(step 3), training steps 4..5" in r.stderr, r.stderr


def test_flags_given_on_resume_apply_from_the_resumed_step(moe_build, tmp_path):
    run = tmp_path / "run"
    common = ("--steps", 8, "--warmup", 2, "--ckpt-every", 4, *BASE)
    assert run_train(moe_build, *common, "--lr", 1e-3, run_dir=run).returncode == 0
    r = run_train(moe_build, *common, "--lr", 2e-4, "--resume-from", 4, run_dir=run)
    assert r.returncode == 0, r.stderr
    assert "--lr 0.001 -> 0.0002" in r.stderr and "applied from step 5" in r.stderr
    lrs = {x["step"]: x["lr"] for x in _train(run / "metrics.jsonl")}
    # the LR logged after step s is the one for step s + 1; the new peak applies from the resumed step
    assert lrs[4] == pytest.approx(1e-3 * warmup_cosine(4, 2, 8, 0.1))
    assert lrs[6] == pytest.approx(2e-4 * warmup_cosine(6, 2, 8, 0.1))
    assert sorted(p.name for p in (run / "abandoned").iterdir()) == ["step_00000008"]  # the old branch's end


def test_grad_clip_zero_means_no_clipping(moe_build, tmp_path):
    losses = {}
    for clip in ("0", "1e12"):
        r = run_train(moe_build, "--steps", 5, "--lr", 3e-3, "--grad-clip", clip, "--ckpt-every", -1, *BASE,
                      run_dir=tmp_path / clip)
        assert r.returncode == 0, r.stderr
        losses[clip] = [x["lm_loss"] for x in _train(tmp_path / clip / "metrics.jsonl")]
    assert losses["0"] == losses["1e12"] and losses["0"][-1] < losses["0"][0]


@pytest.mark.parametrize("flags,message", [
    (("--eval-batches", 0), "--eval-batches 0: must be at least 1 (--val-fraction 0 turns validation off)"),
    (("--log-every", 0), "--log-every 0: must be at least 1"),
    (("--batch-size", 0), "--batch-size 0: must be at least 1"),
    (("--keep", 0), "--keep 0: must be at least 1"),
    (("--keep", -1, "--ckpt-every", 0), "--keep -1: must be at least 1"),
    (("--grad-clip", -1), "--grad-clip -1.0: must be at least 0 (0: no clipping)"),
    (("--seq-len", 65), "--seq-len 65 is longer than the model's context of 64 tokens"),
    (("--steps", 0), "--steps 0: must be at least 1"),
    (("--steps", -1), "--steps -1: must be at least 1"),
    (("--bias-fit", -1), "--bias-fit -1: must be at least 0 (0: keep the compiled biases)"),
    (("--cuda-graphs",), "--cuda-graphs needs a CUDA GPU, and this run is on the CPU"),
    (("--bias-refit-forward", "--bias-refit", 0), "--bias-refit-forward scores a micro-batch again for the refit, "
                                                  "which --bias-refit 0 turns off: drop one of them"),
    (("--cuda-graphs", "--compile", "off"), "--cuda-graphs replays the compiled model's graphs, which --compile off "
                                            "turns off: drop one of them"),
])
def test_flags_that_would_fail_later_are_one_line_at_the_start(moe_build, tmp_path, flags, message):
    line = _one_line_error(run_train(moe_build, "--steps", 2, *flags, run_dir=tmp_path / "run"))
    assert message in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("given,device,pipelined,compiled", [
    ("auto", "cuda", False, True), ("auto", "cpu", False, False), ("auto", "cuda", True, False),
    ("on", "cpu", False, True), ("off", "cuda", False, False)])
def test_compile_is_on_by_default_on_a_gpu_only(given, device, pipelined, compiled):
    assert compiles(SimpleNamespace(compile=given), torch.device(device), pipelined) is compiled


def test_val_fraction_zero_trains_without_validation_to_the_end(moe_build, tmp_path):
    run = tmp_path / "run"
    r = run_train(moe_build, "--steps", 3, "--val-fraction", 0, "--eval-every", 1, "--log-every", 1, run_dir=run)
    assert r.returncode == 0, r.stderr
    assert (run / "final.safetensors").exists() and (run / "checkpoints" / "step_00000003").exists()
    assert {x["kind"] for x in read_metrics(run / "metrics.jsonl")} == {"train"}


def test_an_unwritable_checkpoint_dir_is_found_before_training(moe_build, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("")  # a file where the directory goes: no checkpoint could be written
    line = _one_line_error(run_train(moe_build, "--steps", 2, run_dir=run))
    assert f"cannot write to {run / 'checkpoints'}" in line
    assert not (run / "metrics.jsonl").exists()


def test_resume_of_another_models_run_dir_is_refused(moe_build, tmp_path):
    run = tmp_path / "run"
    assert run_train(moe_build, "--steps", 1, *BASE, run_dir=run).returncode == 0
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "fingerprint": "another"}))
    assert "is a run of another model" in _one_line_error(run_train(moe_build, "--steps", 2, "--resume",
                                                                    run_dir=run))


class _Checkpoints:
    def __init__(self, steps):
        self.steps = steps

    def intact_steps(self):
        return self.steps


def _stop(losses, steps):
    guard = LossGuard()
    with pytest.raises(Exception) as e:
        for step, value in enumerate(losses, 1):
            guard.check(torch.tensor(value), step, _Checkpoints(steps))
    return str(e.value)


def test_the_nan_stop_points_before_the_blow_up():
    # the reproduced case: a checkpoint every step, loss 156629 at step 2, NaN at step 3: checkpoint 2 made
    # the NaN and checkpoint 1 the blow-up, so none predates it
    message = _stop([5.5, 156629.0, math.nan], [1, 2])
    assert "at step 3" in message and "began to blow up at step 2 (156629)" in message
    assert "no checkpoint is from before it" in message and "--overwrite" in message
    message = _stop([5.5, 5.2, 5.0, 4.9, 80.0, math.nan], [2, 4, 5])
    assert "began to blow up at step 5 (80)" in message and "--resume-from 2" in message
    assert "--resume-from 4" not in message  # checkpoint 4 computed step 5's 80


def test_a_fused_adamw_skips_updates_until_the_losses_are_read():
    """What a GPU run does (fused AdamW runs on CPU tensors too): a non-finite loss is read only when due,
    and no update happens from its step on, so the weights stay those that computed it."""
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([p], lr=0.1, fused=True)
    guard = LossGuard(optimizer)
    seen = []
    with pytest.raises(Exception) as e:
        for step, scale in enumerate([1.0, 0.9, math.nan, 0.8, 0.7], 1):
            loss = (p * scale).sum()
            loss.backward()
            guard.check(loss, step, _Checkpoints([1, 2]), due=step == 5)
            optimizer.step()
            optimizer.zero_grad()
            seen.append(p.detach().clone())
    assert "loss is not finite at step 3" in str(e.value) and "--resume-from 1" in str(e.value)
    assert len(seen) == 4 and not torch.equal(seen[0], seen[1])
    assert torch.equal(seen[1], seen[2]) and torch.equal(seen[1], seen[3])  # no update from step 3 on
    assert optimizer.state[p]["step"] == 2


def test_the_nan_stop_advice_works(moe_build, tmp_path):
    run = tmp_path / "run"
    r = run_train(moe_build, "--steps", 8, "--ckpt-every", 2, "--debug-nan-at-step", 6, *BASE, run_dir=run)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]  # after the progress lines
    assert "loss is not finite at step 6" in line and "--resume-from 4" in line
    r = run_train(moe_build, "--steps", 8, "--ckpt-every", 2, "--resume-from", 4, "--lr", 1e-4, *BASE, run_dir=run)
    assert r.returncode == 0, r.stderr
    assert [x["step"] for x in _train(run / "metrics.jsonl")] == list(range(1, 9))
