"""The experts' bf16 weight copies under autocast: made once per optimizer step, reused by every
micro-batch of the step with the gradients a fresh cast gives, and remade after the weights change."""
import torch

from moec.runtime.ops import weight_copies

seen = []  # the data pointer of the weight each call of the op received


@torch.library.custom_op("moec_test::matmul", mutates_args=())
def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    seen.append(w.data_ptr())
    return x @ w


@matmul.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[1])


matmul.register_autograd(lambda ctx, g: (g @ ctx.w.t(), ctx.x.t() @ g),
                         setup_context=lambda ctx, inputs, output: setattr(ctx, "x", inputs[0])
                         or setattr(ctx, "w", inputs[1]))
# the training program registers its experts for CUDA; CPU autocast stands in for it here
weight_copies.register_autocast("moec_test::matmul", "cpu", torch.bfloat16)


def _step(w, batches, opt, cast_each_time: bool):
    opt.zero_grad(set_to_none=True)
    outs = []
    for x in batches:
        with torch.autocast("cpu", torch.bfloat16):
            y = matmul(x, w) if not cast_each_time else matmul(x.bfloat16(), w.bfloat16())
        y.float().square().sum().backward()
        outs.append(y)
    opt.step()
    return outs, w.grad.clone()


def test_one_copy_a_step_with_the_gradients_and_outputs_of_a_fresh_cast(monkeypatch):
    monkeypatch.setattr(weight_copies, "_keeping", False)  # restored after the test
    g = torch.Generator().manual_seed(0)
    init = torch.randn(8, 4, generator=g)
    steps = [[torch.randn(3, 8, generator=g) for _ in range(3)] for _ in range(2)]  # 2 steps x 3 micro-batches
    reference = torch.nn.Parameter(init.clone())
    ref_opt = torch.optim.SGD([reference], lr=0.5)
    kept = torch.nn.Parameter(init.clone())
    opt = torch.optim.SGD([kept], lr=0.5)
    weight_copies.keep_until_step(opt)
    for batches in steps:
        ref_out, ref_grad = _step(reference, batches, ref_opt, cast_each_time=True)
        seen.clear()
        out, grad = _step(kept, batches, opt, cast_each_time=False)
        assert len(set(seen)) == 1, "every micro-batch of the step used the same copy"
        assert all(torch.equal(a, b) for a, b in zip(out, ref_out)), "the copy holds this step's weights"
        assert torch.equal(grad, ref_grad), "each micro-batch's gradient reached the fp32 weight"
    assert torch.equal(kept, reference)


def test_a_copy_made_without_gradients_is_not_kept(monkeypatch):
    # an evaluation's copy carries no gradient back: a training forward after it must make its own
    monkeypatch.setattr(weight_copies, "_keeping", False)
    w = torch.nn.Parameter(torch.randn(8, 4))
    x = torch.randn(3, 8)
    weight_copies.keep_until_step(torch.optim.SGD([w], lr=0.1))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        matmul(x, w)
    with torch.autocast("cpu", torch.bfloat16):
        y = matmul(x, w)
    y.float().sum().backward()
    assert w.grad is not None
    assert torch.equal(w.grad, (x.bfloat16().t() @ torch.ones(3, 4, dtype=torch.bfloat16)).float())
