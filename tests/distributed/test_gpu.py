"""On one GPU: an EP build trains through the EP code path (dispatch/combine,
local expert offsets, balance_counts, grad sync, a NCCL process group) and
matches the CPU fp32 run of the plain build within bf16 tolerance. One
process: NCCL does not take two ranks on one GPU, so the multi-rank
all-to-all is tested on CPU with gloo."""
import pytest
import torch

from tests.distributed import worker
from tests.distributed.builds import compile_builds
from tests.distributed.launch import torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF16_REL = 2e-2


def test_ep_build_on_gpu_matches_cpu_reference(tmp_path):
    variants = ["ep2", "ep4_hier", "ep4_rbd", "ep2_overlap"]
    builds = compile_builds(tmp_path / "builds", ["plain", *variants])
    reference = worker.train(builds["plain"], 10)
    runs = [{"build": builds[b], "steps": 10, "name": b} for b in variants]
    got = torchrun(1, {"runs": runs, "device": "cuda"}, tmp_path)
    for b in variants:
        assert len(got[b]) == len(reference) == 10, (b, len(got[b]), len(reference))
        print(b, "max relative loss difference", max(abs(a - w) / abs(w) for a, w in zip(got[b], reference)))
        for step, (a, want) in enumerate(zip(got[b], reference)):
            assert abs(a - want) <= BF16_REL * abs(want), f"{b} step {step}: {a} vs {want}"
