"""The portable grouped GEMM: kernels against a float64 per-expert loop under
the Triton interpreter (cross-compiling is in test_grouped_gemm_compile.py)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from moec.runtime.kernels import grouped_gemm as gg, launch
from tests.numerics import assert_matches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU the kernels are compiled (tests/conftest.py)

BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)


def _offsets(counts, tail):
    """[E+1] int32 starts; tail unused rows after the last expert."""
    c = torch.tensor(counts, dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), c.cumsum(0)]).to(torch.int32), int(c.sum()) + tail


def _loop_mm(a, b, offsets, N):
    """float64 reference of MM: rows of expert e times b[e]; tail rows zero."""
    out = torch.zeros(N, b.shape[2], dtype=torch.float64)
    o = offsets.tolist()
    for e in range(b.shape[0]):
        out[o[e]:o[e + 1]] = a[o[e]:o[e + 1]].double() @ b[e].double()
    return out


counts_st = st.lists(st.integers(0, 40), min_size=1, max_size=5)


@settings(max_examples=12, deadline=None)
@given(counts=counts_st, tail=st.integers(0, 20), kd=st.integers(1, 40), no=st.integers(1, 40),
       nk=st.booleans(), seed=st.integers(0, 2**16))
def test_mm_matches_loop(counts, tail, kd, no, nk, seed):
    g = torch.Generator().manual_seed(seed)
    offsets, N = _offsets(counts, tail)
    E = len(counts)
    a = torch.randn(N, kd, generator=g)
    w = torch.randn(E, no, kd, generator=g) if nk else torch.randn(E, kd, no, generator=g)
    b = w.transpose(1, 2) if nk else w  # [E, KD, NO] either way
    c = torch.full((N, no), float("nan"), device=DEVICE)  # poison: every row must be written
    gg.grouped_mm(gg.MM, a.to(DEVICE), b.to(DEVICE), offsets.to(DEVICE), c, blocks=BLOCKS)
    assert not c.isnan().any()
    assert_matches(c, _loop_mm(a, b, offsets, N))


@settings(max_examples=10, deadline=None)
@given(counts=counts_st, m1=st.integers(1, 40), m2=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_wgrad_matches_loop(counts, m1, m2, seed):
    g = torch.Generator().manual_seed(seed)
    offsets, N = _offsets(counts, 3)
    a, b = torch.randn(N, m1, generator=g), torch.randn(N, m2, generator=g)
    o = offsets.tolist()
    ref = torch.stack([a[o[e]:o[e + 1]].double().t() @ b[o[e]:o[e + 1]].double() for e in range(len(counts))])
    got = gg.grouped_wgrad(a.to(DEVICE), b.to(DEVICE), offsets.to(DEVICE), BLOCKS)
    assert_matches(got, ref)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
def test_fused_epilogues_forward_and_backward(gated, activation):
    """GLU/ACT forward epilogue and GLU_BWD/ACT_BWD backward epilogue against autograd in float64."""
    g = torch.Generator().manual_seed(1)
    offsets, N = _offsets([7, 0, 19, 3], 5)
    E, D, F = 4, 24, 40
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) / 3
    x, w1, w3, w2, b1, b3, b2 = mk(N, D), mk(E, F, D), mk(E, F, D), mk(E, D, F), mk(E, F), mk(E, F), mk(E, D)
    if not gated:
        w3 = b3 = None
    from moec.runtime.ops.experts import experts_reference

    leaves = [t.requires_grad_() for t in (x, w1, b1, w3, b3, w2, b2) if t is not None]
    ref = experts_reference(x, offsets, w1, b1, w3, b3, w2, b2, activation)
    gy = mk(N, D)
    ref_grads = torch.autograd.grad(ref, leaves, gy)
    f = lambda t: None if t is None else t.detach().float().to(DEVICE)
    args = [f(t) for t in (x, offsets, w1, b1, w3, b3, w2, b2)]
    args[1] = offsets.to(DEVICE)
    out, h1, h3 = gg.experts_forward(*args, activation, True, BLOCKS)
    assert_matches(out, ref.detach())
    for saved in (True, False):
        pre = (h1, h3) if saved else (None, None)
        grads = [t for t in gg.experts_backward(f(gy), *args, activation, *pre, blocks=BLOCKS) if t is not None]
        assert len(grads) == len(ref_grads)
        for got, want in zip(grads, ref_grads):
            assert_matches(got, want)


@pytest.mark.parametrize("split", [True, False])
def test_split_backward_and_glu_kernel(monkeypatch, split):
    """Backward through a plain dH GEMM plus the elementwise GLU kernel equals the fused epilogue's."""
    g = torch.Generator().manual_seed(3)
    offsets, N = _offsets([9, 0, 14], 6)
    E, D, F = 3, 16, 40
    mk = lambda *s: (torch.randn(*s, generator=g) / 3).to(DEVICE)
    x, w1, w3, w2, gy = mk(N, D), mk(E, F, D), mk(E, F, D), mk(E, D, F), mk(N, D)
    offsets = offsets.to(DEVICE)
    from moec.runtime.ops.experts import reference_backward

    arch = launch.arch_of(x.device)
    monkeypatch.setitem(launch.LAUNCH["grouped_mm_glu"], arch, dict(launch.launch("grouped_mm_glu", arch),
                                                                  split_bwd=split))
    assert gg.split_bwd(x.device) == split
    got = gg.experts_backward(gy, x, offsets, w1, None, w3, None, w2, None, "gelu", blocks=BLOCKS)
    want = reference_backward(gy, x, offsets, w1, None, w3, None, w2, None, "gelu")
    for a, b in zip(got, want):
        if b is not None:
            assert_matches(a, b)


def test_glu_forward_kernel_zeroes_the_tail():
    from moec.runtime.kernels.grouped_gemm_glu import glu_forward

    g = torch.Generator().manual_seed(4)
    offsets, N = _offsets([5, 3], 7)
    h1, h3 = (torch.randn(N, 300, generator=g).to(DEVICE) for _ in range(2))
    h = glu_forward(h1, h3, offsets.to(DEVICE), "silu")
    used = int(offsets[-1])
    torch.testing.assert_close(h[:used], torch.nn.functional.silu(h1[:used]) * h3[:used])
    assert h[used:].abs().sum() == 0
