"""On a GPU: a training step waits for the GPU only where it reads values (the steps that log, and
checkpoints), the NaN stop still stops a run whose fused AdamW skips updates until the losses are read,
and the first record counts the kernels of a step. train.py --debug-syncs turns any other wait (.item(),
a pageable copy, a data-dependent shape) into an error."""
import pytest
import torch

import moec.runtime.ops  # noqa: F401  registers the moec:: ops
from moec.runtime.training.progress import read_metrics
from tests.train.conftest import run_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = ["--device", "cuda", "--eval-every", 0, "--ckpt-every", -1, "--bias-fit", 0, "--bias-refit", 0]


@pytest.mark.parametrize("mode", [["--compile", "off"], [], ["--cuda-graphs"]])  # [] compiles: the GPU default
def test_steps_that_log_nothing_never_wait_for_the_gpu(moe_build, tmp_path, mode):
    r = run_train(moe_build, "--steps", 9, "--log-every", 4, "--debug-syncs", *mode, *GPU, run_dir=tmp_path,
                  timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [x for x in read_metrics(tmp_path / "metrics.jsonl") if x["kind"] == "train"]
    assert [x["step"] for x in records] == [4, 8]
    assert records[0]["kernels_per_step"] > 0  # step 4: the first logged step after the warm-up step
    assert "kernels_per_step" not in records[1]
    if mode == ["--compile", "off"]:
        assert "graph_breaks" not in records[0]
    else:
        assert records[0]["graph_breaks"] == 0
    if mode == ["--cuda-graphs"]:
        assert "cudagraph_skips" not in records[0], records[0]


def test_the_nan_stop_reads_at_the_next_checkpoint_and_keeps_the_weights(moe_build, tmp_path):
    r = run_train(moe_build, "--steps", 12, "--log-every", 10, "--ckpt-every", 4, "--debug-nan-at-step", 6,
                  "--device", "cuda", "--eval-every", 0, run_dir=tmp_path, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "loss is not finite at step 6" in r.stderr and "--resume-from 4" in r.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004"]


def test_permute_casts_the_tokens_under_autocast():
    from moec.codegen import permute
    generated = permute.module(permute.permute_config(torch.float32, 2, False)).OP
    x = torch.randn(8, 16, device="cuda", requires_grad=True)
    row_map = torch.arange(16, device="cuda", dtype=torch.int32)
    for op in (torch.ops.moec.permute.default, generated):
        with torch.autocast("cuda", torch.bfloat16):
            y = op(x, row_map, 2)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, x.detach().repeat_interleave(2, 0).bfloat16())
        (g,) = torch.autograd.grad(y.float().sum(), x)
        assert g.dtype == torch.float32 and (g == 2).all()


def test_the_experts_reuse_one_bf16_copy_of_their_weights_until_the_optimizer_steps(monkeypatch):
    from moec.runtime.ops import weight_copies
    monkeypatch.setattr(weight_copies, "_keeping", False)  # restored after the test
    w1, w2 = (torch.nn.Parameter(torch.randn(2, *s, device="cuda") / 4) for s in ((32, 16), (16, 32)))
    x = torch.randn(8, 16, device="cuda")
    offsets = torch.tensor([0, 4, 8], device="cuda", dtype=torch.int32)
    opt = torch.optim.SGD([w1, w2], lr=0.1)
    weight_copies.keep_until_step(opt)

    def micro_batch():
        with torch.autocast("cuda", torch.bfloat16):
            y = torch.ops.moec.experts(x, offsets, w1, None, None, None, w2, None, "relu")
        y.float().square().sum().backward()
        return y

    outs = [micro_batch() for _ in range(2)]
    kept = weight_copies.cast(w1, torch.bfloat16)
    assert outs[0].dtype == torch.bfloat16 and torch.equal(outs[0], outs[1])
    grad = w1.grad.clone()
    opt.zero_grad()
    micro_batch()
    torch.testing.assert_close(2 * w1.grad, grad, rtol=0, atol=0)  # both micro-batches' gradients arrived
    opt.step()
    assert weight_copies.cast(w1, torch.bfloat16) is not kept  # the step's new weights are cast afresh
