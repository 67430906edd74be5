"""Tiny MoE builds shared by the train.py tests (2 layers, 4 experts, top-2: one with
capacity factor 1.25, one compiled for EP=2), and a helper to run a build's train.py
as a user would, on one process or under torchrun (gloo)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moec.driver.compiler import compile_model
from moec.base.options import Options
from tests.launcher import TORCHRUN

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=64)
# few steps, small batches, every kind of event early
FAST = ["--batch-size", "4", "--seq-len", "32", "--warmup", "2", "--eval-batches", "2",
        "--device", "cpu"]  # gloo on CPUs, also on a GPU machine: runs of 1 and N processes compare bitwise


@pytest.fixture(scope="session")
def moe_build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("builds") / "gpt-moe"
    options = Options(experts=4, topk=2, capacity_factor=1.25, overrides=TINY, verify=False)
    compile_model(str(ROOT / "examples" / "gpt.py"), str(out), options, log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def ep2_build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("builds") / "gpt-moe-ep2"
    options = Options(experts=4, topk=2, overrides=TINY, verify=False, ep=2)
    compile_model(str(ROOT / "examples" / "gpt.py"), str(out), options, log=lambda *a: None)
    return out


def run_train(build: Path, *args, run_dir: Path, nproc: int = 1, background: bool = False, timeout: int = 120):
    """train.py with FAST and args; nproc > 1: under torchrun, gloo on CPU."""
    launch = TORCHRUN + ["--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    cmd = [*launch, str(build / "train.py"), *FAST, "--run-dir", str(run_dir), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every run: bitwise comparisons
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
