"""Soak: a run killed at random (SIGKILL and SIGTERM, also mid-checkpoint) and resumed each time ends with
the weights of an uninterrupted run, on one process and expert parallel (EP=2) under torchrun, on CPU.

    python -m tests.train.soak --steps 100 --kills 12

Not part of the test suite (minutes of wall time); prints one line per interruption and exits 1 on any
difference.
"""
import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from moec.base.options import Options
from moec.driver.compiler import compile_model
from tests.train.conftest import FAST, ROOT, TINY

# steps long enough (a few tenths of a second) that kills land in training and in checkpoint writes
ARGS = ["--batch-size", "16", "--seq-len", "64", "--ckpt-every", "5", "--log-every", "5", "--eval-every", "25",
        "--keep", "2"]


def _command(build: Path, run: Path, steps: int, nproc: int, resume: bool) -> list[str]:
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                                 if nproc > 1 else [])
    return [*launch, str(build / "train.py"), *FAST, *ARGS, "--steps", str(steps), "--run-dir", str(run),
            *(["--resume"] if resume else [])]


def _run(cmd) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # a process group: torchrun and its workers get the signal


def _final_state(run: Path, steps: int) -> dict:
    """The last checkpoint's tensors, whatever its layout (an EP run writes no final.safetensors)."""
    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(run / "checkpoints" / f"step_{steps:08d}", Path(d) / "state.pt")
        state = torch.load(Path(d) / "state.pt", weights_only=False)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value
    walk("", state)
    return flat


def soak(build: Path, work: Path, steps: int, kills: int, nproc: int, rng: random.Random) -> bool:
    reference, t0 = work / "reference", time.perf_counter()
    r = subprocess.run(_command(build, reference, steps, nproc, False), capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    whole = time.perf_counter() - t0
    run, starts, kills_sent = work / "interrupted", 0, []
    for i in range(kills):
        proc = _run(_command(build, run, steps, nproc, resume=starts > 0))
        starts += 1
        time.sleep(rng.uniform(0.1, 0.6) * whole)  # some kills land in start-up, most in training
        mid_save = (run / "checkpoints").exists() and any((run / "checkpoints").glob(".tmp_step_*"))
        if proc.poll() is not None:
            print(f"  {build.name}: start {starts} ended by itself, exit {proc.returncode}", flush=True)
            break
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        os.killpg(proc.pid, sig)
        proc.wait()
        kills_sent.append(sig.name)
        done = sorted(p.name for p in (run / "checkpoints").glob("step_*")) if (run / "checkpoints").exists() else []
        print(f"  {build.name}: start {starts}: {sig.name}{' during a checkpoint write' if mid_save else ''} -> "
              f"exit {proc.returncode}, newest checkpoint "
              f"{done[-1] if done else 'none'}", flush=True)
    while True:  # run it out
        proc = _run(_command(build, run, steps, nproc, resume=starts > 0))
        starts += 1
        _, err = proc.communicate()
        if proc.returncode == 0 or "already" in err:  # done, or killed after its last checkpoint
            break
        assert starts < kills + 10, err[-2000:]
    ours, theirs = _final_state(run, steps), _final_state(reference, steps)
    same = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    print(f"{build.name}: {starts} starts ({kills_sent.count('SIGKILL')} SIGKILL, {kills_sent.count('SIGTERM')} "
          f"SIGTERM), {len(ours)} tensors in the final checkpoint: "
          f"{'bitwise equal to' if same else 'DIFFERENT from'} the uninterrupted run", flush=True)
    return same


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--kills", type=int, default=12, help="interruptions per run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    ok = True
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for name, ep, nproc in (("moe", 1, 1), ("moe-ep2", 2, 2)):
            build = d / name
            compile_model(str(ROOT / "examples" / "gpt.py"), str(build),
                          Options(experts=4, topk=2, overrides=TINY, verify=False, ep=ep), log=lambda *a: None)
            (d / f"work-{name}").mkdir()
            ok &= soak(build, d / f"work-{name}", args.steps, args.kills, nproc, rng)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
