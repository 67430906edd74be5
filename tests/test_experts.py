"""moec::experts: every backend against the reference loop, gradients, empty
experts and inputs, recompute, the backend rule, errors, capture."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import moec
from moec.runtime.ops.experts import choose_backend, experts
from tests.numerics import assert_matches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU the kernels are compiled (tests/conftest.py)

PARAMS = ("w1", "b1", "w3", "b3", "w2", "b2")
# elementwise parts no kernel fuses, as find_ffn writes them: squared ReLU, and x*sigmoid(1.702x) gating
RELU2 = "relu = aten.relu.default(h1); square = aten.square.default(relu)"
QUICK_GLU = ("mul = aten.mul.Tensor(h1, 1.702); sig = aten.sigmoid.default(mul); g = aten.mul.Tensor(h1, sig); "
             "out = aten.mul.Tensor(g, h3)")


def _activation(name: str, gated: bool) -> str:
    """A fused activation's name, or for "expression" the expression that fits the FFN's kind."""
    return (QUICK_GLU if gated else RELU2) if name == "expression" else name


def _case(counts, tail, D, F, gated, bias, seed, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(counts, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), c.cumsum(0)]).to(torch.int32)
    N, E = int(c.sum()) + tail, len(counts)
    mk = lambda *s: (torch.randn(*s, generator=g) / 3).to(device, dtype).requires_grad_()
    p = dict(w1=mk(E, F, D), b1=mk(E, F) if bias else None, w3=mk(E, F, D) if gated else None,
             b3=mk(E, F) if gated and bias else None, w2=mk(E, D, F), b2=mk(E, D) if bias else None)
    return mk(N, D), offsets.to(device), p, (torch.randn(N, D, generator=g)).to(device, dtype)


def _run(x, offsets, p, gy, activation, **kw):
    y = experts(x, offsets, *(p[n] for n in PARAMS), activation, **kw)
    leaves = [x] + [p[n] for n in PARAMS if p[n] is not None]
    return y, torch.autograd.grad(y, leaves, gy)


@settings(max_examples=8, deadline=None)
@given(counts=st.lists(st.integers(0, 24), min_size=1, max_size=5), tail=st.integers(0, 6),
       D=st.sampled_from([16, 24]), F=st.sampled_from([16, 40]), gated=st.booleans(), bias=st.booleans(),
       activation=st.sampled_from(["silu", "gelu", "gelu_tanh", "relu", "expression"]), recompute=st.booleans(),
       seed=st.integers(0, 2**16))
def test_triton_backend_matches_reference(counts, tail, D, F, gated, bias, activation, recompute, seed):
    activation = _activation(activation, gated)
    x, offsets, p, gy = _case(counts, tail, D, F, gated, bias, seed)
    y_ref, g_ref = _run(x, offsets, p, gy, activation, backend="reference")
    y, g = _run(x, offsets, p, gy, activation, backend="triton", recompute=recompute)
    assert_matches(y, y_ref)
    assert y[int(offsets[-1]):].abs().sum() == 0  # unused tail rows
    assert len(g) == len(g_ref)
    for a, b in zip(g, g_ref):
        assert_matches(a, b)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_expression_activation_is_the_written_function(backend, gated):
    """Against plain torch per expert, written independently of moec: the expression's value and its
    gradients (autograd through the formula)."""
    x, offsets, p, gy = _case([5, 0, 9], 3, 16, 24, gated, True, 1)
    y, g = _run(x, offsets, p, gy, _activation("expression", gated), backend=backend)
    bounds = offsets.tolist()
    parts = []
    for e in range(3):
        xe = x[bounds[e]:bounds[e + 1]]
        h1 = xe @ p["w1"][e].t() + p["b1"][e]
        h = torch.relu(h1) ** 2 if not gated else h1 * torch.sigmoid(1.702 * h1) * (xe @ p["w3"][e].t() + p["b3"][e])
        parts.append(h @ p["w2"][e].t() + p["b2"][e])
    ref = torch.cat(parts + [x.new_zeros(3, 16)])
    leaves = [x] + [p[n] for n in PARAMS if p[n] is not None]
    assert_matches(y, ref)
    for a, b in zip(g, torch.autograd.grad(ref, leaves, gy)):
        assert_matches(a, b)


def test_expression_must_fit_the_ffn_kind():
    x, offsets, p, _ = _case([4], 0, 16, 16, False, False, 0)
    with pytest.raises(moec.MoecError, match="uses h3, but the experts are plain"):
        experts(x, offsets, *(p[n] for n in PARAMS), QUICK_GLU)
    with pytest.raises(moec.MoecError, match="sum.dim_IntList is not elementwise"):
        experts(x, offsets, *(p[n] for n in PARAMS), "s = aten.sum.dim_IntList(h1, [0])")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("counts,tail", [([0, 0, 0], 0), ([0, 0, 0], 5), ([9], 0), ([0, 7, 0], 0)])
def test_empty_inputs_and_zero_token_experts(backend, counts, tail):
    x, offsets, p, gy = _case(counts, tail, 16, 32, True, True, 0)
    y, g = _run(x, offsets, p, gy, "silu", backend=backend)
    assert y.shape == x.shape
    assert y[int(offsets[-1]):].abs().sum() == 0
    for name, grad in zip(["x"] + [n for n in PARAMS], g):
        for e, n in enumerate(counts):
            if n == 0 and name != "x":
                assert grad[e].abs().sum() == 0, f"{name} of empty expert {e}"
    if sum(counts) == 0:
        assert all(t.abs().sum() == 0 for t in g)


def test_recompute_keeps_less_for_backward():
    x, offsets, p, gy = _case([20, 0, 12], 2, 16, 48, True, False, 3)

    def saved_bytes(recompute):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = experts(x, offsets, *(p[n] for n in PARAMS), "silu", recompute=recompute, backend="triton")
        torch.autograd.grad(y, [x], gy)
        return sum(sizes)

    N, F = x.shape[0], 48
    assert saved_bytes(False) - saved_bytes(True) == 2 * N * F * 4  # h1 and h3, fp32


def test_backend_rule():
    bf16, f32 = torch.bfloat16, torch.float32
    assert choose_backend("cpu", bf16, False, (0, 0), True) == "reference"
    assert choose_backend("cuda", bf16, False, (9, 0), True) == "grouped_mm"
    assert choose_backend("cuda", bf16, False, (10, 0), True) == "grouped_mm"
    assert choose_backend("cuda", bf16, False, (8, 0), True) == "triton"
    assert choose_backend("cuda", bf16, False, (9, 0), False) == "triton"
    assert choose_backend("cuda", f32, False, (9, 0), True) == "triton"
    assert choose_backend("cuda", bf16, True, (9, 4), True) == "triton"  # ROCm (MI300X reports 9.4)
    assert choose_backend("cuda", torch.float64, False, (9, 0), True) == "reference"


def test_user_errors_name_the_fix():
    x, offsets, p, _ = _case([3, 2], 0, 16, 32, False, False, 0)
    w = [p[n] for n in PARAMS]
    with pytest.raises(moec.MoecError, match="activation"):
        experts(x, offsets, *w, "swish")
    with pytest.raises(moec.MoecError, match="offsets"):
        experts(x, offsets[:-1], *w, "silu")
    with pytest.raises(moec.MoecError, match="backend"):
        experts(x, offsets, *w, "silu", backend="cutlass")
    with pytest.raises(moec.MoecError, match="grouped_mm"):
        experts(x, offsets, *w, "silu", backend="grouped_mm")
    with pytest.raises(moec.MoecError, match="shapes"):
        experts(x[:, :8], offsets, *w, "silu")


def test_meta_and_export_keep_one_op():
    x, offsets, p, _ = _case([3, 2], 1, 16, 32, True, False, 0)
    meta = lambda t: None if t is None else t.detach().to("meta")
    y = experts(meta(x), meta(offsets), *(meta(p[n]) for n in PARAMS), "silu")
    assert y.shape == x.shape and y.device.type == "meta"

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w3, self.w2 = (torch.nn.Parameter(p[n].detach()) for n in ("w1", "w3", "w2"))

        def forward(self, x, offsets):
            return torch.ops.moec.experts(x, offsets, self.w1, None, self.w3, None, self.w2, None, "silu")

    gm = torch.export.export(Experts(), (x.detach(), offsets)).module()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.moec.experts.default in targets
    torch.testing.assert_close(gm(x.detach(), offsets), Experts()(x.detach(), offsets))


def _gpu_backends() -> list[str]:
    """The GPU backends this machine runs: triton always, grouped_mm where it is the bf16 choice."""
    if not torch.cuda.is_available():
        return ["triton"]
    fast = choose_backend("cuda", torch.bfloat16, torch.version.hip is not None,
                          torch.cuda.get_device_capability(), hasattr(torch, "_grouped_mm"))
    return ["triton"] + (["grouped_mm"] if fast == "grouped_mm" else [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: bf16 backends at a real shape")
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("activation", ["silu", QUICK_GLU])
def test_gpu_backends_at_real_shape(backend, activation):
    counts = [300, 0, 1100, 17, 640, 0, 5, 2000]
    x, offsets, p, gy = _case(counts, 31, 1024, 768, True, False, 0, torch.bfloat16, "cuda")
    y_ref, g_ref = _run(x, offsets, p, gy, activation, backend="reference")
    for recompute in (False, True):
        y, g = _run(x, offsets, p, gy, activation, backend=backend, recompute=recompute)
        rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert rel(y, y_ref) < 1e-2
        assert y[int(offsets[-1]):].abs().sum() == 0
        assert all(rel(a, b) < 2e-2 for a, b in zip(g, g_ref))
