"""Tiny MoE builds shared by the train.py tests (2 layers, 4 experts, top-2: one with
capacity factor 1.25, one compiled for EP=2), a helper to run a build's train.py
as a user would, on one process or under torchrun (gloo), and two for the runs of
several processes: experts that get no token, and the collectives every rank issued."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moec.driver.compiler import compile_model
from moec.base.options import Options
from moec.runtime.distributed.trace import agreement
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


def starve_experts(build: Path, layer: int, fed: list) -> None:
    """Every token of MoE layer `layer` goes to the experts `fed` (top-k of them) and the others get none:
    its router's selection biases, in the build's weights, outweigh any score."""
    bias = json.loads((build / "config.json").read_text())["result"]["router_biases"][layer]
    weights = load_file(build / "weights.safetensors")
    weights[bias] = torch.tensor([10.0 if e in fed else -10.0 for e in range(weights[bias].numel())])
    save_file(weights, build / "weights.safetensors")


def collectives(run_dir: Path, nproc: int) -> tuple[dict, set]:
    """({frozenset of a group's ranks: the ops issued on it}, {(rank, peer) of each transfer}) of a run under
    --debug-collectives, once every group's members are seen to have issued the same collectives on it and
    every send its receive."""
    records = {r: json.loads((run_dir / "collectives" / f"rank{r}.json").read_text()) for r in range(nproc)}
    assert agreement(records) == []
    ops = {}
    for record in records.values():
        for op, group, _ in record["collectives"]:
            ops.setdefault(frozenset(record["groups"][group]), set()).add(op)
    return ops, {(r, peer) for r, record in records.items() for _, peer, _ in record["transfers"]}
