"""Generated gating kernels against moec::gate / moec::gate_backward, on random configurations.
With no GPU the Triton kernels run under the interpreter on CPU tensors."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import moec
from moec.codegen import gating

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _inputs(cfg, T, seed, ties):
    g = torch.Generator().manual_seed(seed)
    E = cfg.num_experts
    if ties:  # a coarse grid: many equal logits, so the tie rule decides
        logits = torch.randint(-6, 7, (T, E), generator=g) / 4
    else:
        logits = torch.randn(T, E, generator=g) * 2
    bias = (torch.randint(-2, 3, (E,), generator=g) / 8) if cfg.bias else None
    logits = logits.to(DTYPES[cfg.dtype]).to(DEVICE)
    return logits, None if bias is None else bias.to(DEVICE)


def _near_tied_rows(cfg, logits, bias) -> torch.Tensor:
    """[T] bool: rows whose choice turns on two different values within fp32 rounding of each other (the
    kernel computes the scores in its own fp32 arithmetic, so either side of such a gap is right): adjacent
    values among the top topk_group + 1 group scores, or among the top k + 1 selection scores of the kept
    groups. Exactly equal values are not near ties: both sides rank them by index."""
    routing = moec.runtime.ops.routing
    sel = routing._scores(logits.cpu(), cfg.score)
    sel = sel if bias is None else sel + bias.cpu().to(sel.dtype)
    T, E = sel.shape

    def near(values, n):  # values [T, m]: any two adjacent of the n + 1 largest apart by at most 4 ulps
        top = values.sort(dim=-1, descending=True).values[:, :n + 1]
        a, b = top[:, :-1], top[:, 1:]
        gap = (a - b).abs()
        return ((gap > 0) & (gap <= 4 * torch.finfo(torch.float32).eps * torch.maximum(a.abs(), b.abs()))).any(-1)

    tied = torch.zeros(T, dtype=torch.bool)
    if cfg.n_group > 1:
        groups = sel.view(T, cfg.n_group, E // cfg.n_group)
        scores = groups.sort(dim=-1, descending=True).values[..., :2].sum(-1)
        tied |= near(scores, cfg.topk_group)
        keep = scores.sort(dim=-1, descending=True, stable=True).indices[:, :cfg.topk_group]
        mask = torch.zeros(T, cfg.n_group, dtype=torch.bool).scatter_(1, keep, True)
        sel = sel.masked_fill(~mask.repeat_interleave(E // cfg.n_group, dim=1), float("-inf"))
    return tied | near(sel, cfg.k)


def _check(cfg, logits, bias, seed):
    mod = gating.module(cfg)
    args = (cfg.k, cfg.score, cfg.renorm, bias, cfg.n_group, cfg.topk_group)
    w, idx, counts, probs_sum, zsum = mod.forward(logits, bias)
    rw, ridx, rcounts, rprobs, rz = (t.to(DEVICE) for t in moec.runtime.ops.routing.gate(logits.cpu(), *args[:3],
                                                                          None if bias is None else bias.cpu(),
                                                                          *args[4:]))
    T = logits.shape[0]
    decided = ~_near_tied_rows(cfg, logits, bias).to(DEVICE)
    assert torch.equal(idx[decided], ridx[decided])
    assert torch.equal(counts, torch.bincount(idx.flatten().long(), minlength=cfg.num_experts).to(counts.dtype))
    if decided.all():
        assert torch.equal(counts, rcounts)
    torch.testing.assert_close(w[decided], rw[decided], rtol=4e-6, atol=1e-7)
    # sums over T tokens in another order: fp32 rounding grows with T
    torch.testing.assert_close(probs_sum, rprobs, rtol=4e-6 * max(T, 1) ** 0.5, atol=1e-6)
    torch.testing.assert_close(zsum, rz, rtol=4e-6 * max(T, 1) ** 0.5, atol=1e-6)

    g = torch.Generator().manual_seed(seed + 1)
    g_w = torch.randn(T, cfg.k, generator=g).to(DEVICE)
    g_p = torch.randn(cfg.num_experts, generator=g).to(DEVICE)
    g_z = torch.randn((), generator=g).to(DEVICE)
    got = mod.backward(logits, idx, g_w, g_p, g_z)
    # reference in fp32 from the same inputs and picks: ours is that value rounded once to the logits' dtype
    ref32 = moec.runtime.ops.routing.gate_backward(logits.float().cpu(), idx.cpu(), cfg.score, cfg.renorm, g_w.cpu(),
                                                   g_p.cpu(), g_z.cpu()).to(DEVICE)
    half_ulp = {"bf16": 2.0 ** -8, "fp32": 0.0}[cfg.dtype]
    torch.testing.assert_close(got.float(), ref32, rtol=half_ulp + 4e-6, atol=1e-6)


@st.composite
def configs(draw):
    E = draw(st.integers(1, 12))
    divisors = [d for d in range(2, E + 1) if E % d == 0]
    n_group = draw(st.sampled_from([1] + divisors))
    topk_group = draw(st.integers(1, n_group)) if n_group > 1 else 1
    k = draw(st.integers(1, E))
    return gating.config(DTYPES[draw(st.sampled_from(["bf16", "fp32"]))], E, k,
                         draw(st.sampled_from(["softmax", "sigmoid"])), draw(st.booleans()), draw(st.booleans()),
                         n_group, topk_group)


@settings(max_examples=30, deadline=None)
@given(cfg=configs(), T=st.sampled_from([0, 1, 2, 17, 70]), seed=st.integers(0, 2 ** 16), ties=st.booleans())
def test_gate_matches_reference(cfg, T, seed, ties):
    logits, bias = _inputs(cfg, T, seed, ties)
    _check(cfg, logits, bias, seed)


@pytest.mark.parametrize("cfg", [
    gating.GateConfig("softmax", 8, 2, True, False, 1, 1, "bf16"),  # Mixtral
    gating.GateConfig("softmax", 128, 8, True, False, 1, 1, "bf16"),  # Qwen3-30B-A3B
    gating.GateConfig("sigmoid", 256, 8, True, True, 8, 4, "fp32"),  # DeepSeek-V3
    gating.GateConfig("softmax", 7, 7, False, False, 1, 1, "fp32"),  # K = E, E not a power of two
], ids=lambda c: c.name)
def test_gate_model_shapes(cfg):
    logits, bias = _inputs(cfg, 33, 0, ties=False)
    _check(cfg, logits, bias, 0)


def test_all_tokens_to_one_expert_and_empty_experts():
    cfg = gating.GateConfig("sigmoid", 10, 1, True, True, 1, 1, "fp32")
    logits, _ = _inputs(cfg, 40, 3, ties=False)
    bias = torch.zeros(10, device=DEVICE)
    bias[7] = 5.0  # outranks every sigmoid score: expert 7 takes every token, the others none
    _check(cfg, logits, bias, 3)
    counts = gating.module(cfg).forward(logits, bias)[2]
    assert counts.tolist() == [0] * 7 + [40] + [0] * 2


def test_ties_pick_the_lower_expert():
    cfg = gating.GateConfig("softmax", 6, 3, False, False, 1, 1, "fp32")
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 3.0]], device=DEVICE)
    idx = gating.module(cfg).forward(logits, None)[1]
    assert idx.tolist() == [[1, 2, 4]]


def test_op_dispatches_to_reference_on_cpu_with_autograd():
    cfg = gating.GateConfig("softmax", 5, 2, True, False, 1, 1, "fp32")
    op = gating.module(cfg).OP
    x = torch.randn(9, 5, requires_grad=True)
    out = op(x, 2, "softmax", True, None, 1, 1)
    ref = moec.runtime.ops.routing.gate(x, 2, "softmax", True, None, 1, 1)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    (out[0].sum() + out[3].square().sum() + out[4]).backward()
    g = x.grad.clone()
    x.grad = None
    (ref[0].sum() + ref[3].square().sum() + ref[4]).backward()
    assert torch.equal(g, x.grad)


def test_bad_configuration_is_a_user_error():
    with pytest.raises(moec.MoecError):
        gating.config(torch.float32, 6, 7, "softmax", True, False, 1, 1)
    with pytest.raises(moec.MoecError):
        gating.config(torch.float32, 6, 2, "softmax", True, False, 4, 1)
    with pytest.raises(moec.MoecError):
        gating.config(torch.float32, 6, 2, "relu", True, False, 1, 1)
