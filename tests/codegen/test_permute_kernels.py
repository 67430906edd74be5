"""Generated routing-metadata, permute and unpermute kernels against moec::route /
permute / unpermute and their backward, on random shapes and routings.
With no GPU the Triton kernels run under the interpreter on CPU tensors."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import moec
from moec.codegen import permute, routing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HALF_ULP = {"bf16": 2.0 ** -8, "fp32": 0.0}  # one rounding of an fp32 result to the dtype


def _indices(T, K, E, skew, g):
    """[T, K] distinct experts per token; skew: uniform, zipf-like, or one hot expert (all tokens)."""
    if skew == "uniform":
        score = torch.rand(T, E, generator=g)
    elif skew == "zipf":
        score = torch.rand(T, E, generator=g) / torch.arange(1, E + 1).float() ** 1.2
    else:  # every token picks expert E-1 first, so the other experts may get none
        score = torch.rand(T, E, generator=g)
        score[:, -1] = 2.0
    return score.topk(K, dim=1).indices.int()


def _close(out, ref32, dtype, atol):
    torch.testing.assert_close(out.float(), ref32, rtol=HALF_ULP[dtype] + 4e-6, atol=atol)


@settings(max_examples=30, deadline=None)
@given(T=st.sampled_from([0, 1, 3, 29, 64]), E=st.integers(1, 13), data=st.data(),
       D=st.sampled_from([1, 8, 33, 130, 700]), dtype=st.sampled_from(["bf16", "fp32"]),
       skew=st.sampled_from(["uniform", "zipf", "one"]), seed=st.integers(0, 2 ** 16))
def test_route_permute_unpermute_match_reference(T, E, data, D, dtype, skew, seed):
    K = data.draw(st.integers(1, E), label="K")
    capacity = data.draw(st.sampled_from([0, 0, 1, max(1, T * K // E)]), label="capacity")
    g = torch.Generator().manual_seed(seed)
    idx = _indices(T, K, E, skew, g)
    row_map, offsets = routing.module(routing.config(E, capacity)).forward(idx.to(DEVICE))
    ref_rows, ref_offsets = moec.runtime.ops.routing.route(idx, E, capacity)
    assert torch.equal(row_map.cpu(), ref_rows) and torch.equal(offsets.cpu(), ref_offsets)

    dt = DTYPES[dtype]
    x = torch.randn(T, D, generator=g).to(dt)
    y = torch.randn(T * K, D, generator=g).to(dt)
    w = torch.rand(T, K, generator=g)
    g_out = torch.randn(T, D, generator=g).to(dt)
    dev = lambda *ts: [t.to(DEVICE) for t in ts]  # noqa: E731
    xd, yd, wd, god, rm = dev(x, y, w, g_out, ref_rows)
    drop = capacity > 0

    pm = permute.module(permute.permute_config(dt, K, drop))
    assert torch.equal(pm.forward(xd, rm).cpu(), moec.runtime.ops.routing.permute(x, ref_rows, K))
    ones = torch.ones(T, K)
    atol = 4e-6 * K
    _close(pm.backward(yd, rm).cpu(), moec.runtime.ops.routing.unpermute(y.float(), ref_rows, ones), dtype, atol)

    um = permute.module(permute.unpermute_config(dt, torch.float32, K, drop))
    _close(um.forward(yd, rm, wd).cpu(), moec.runtime.ops.routing.unpermute(y.float(), ref_rows, w), dtype, atol)
    g_y, g_w = um.backward(god, yd, rm, wd)
    ref_gy, ref_gw = moec.runtime.ops.routing.unpermute_backward(g_out, y, ref_rows, w)
    assert torch.equal(g_y.cpu(), ref_gy)  # one product rounded once, as the reference does
    ref_gw32 = moec.runtime.ops.routing.unpermute_backward(g_out.float(), y.float(), ref_rows, w)[1]
    torch.testing.assert_close(g_w.cpu(), ref_gw32, rtol=4e-6, atol=4e-6 * D ** 0.5)


def test_capacity_drops_the_later_slots():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [2, 0]], dtype=torch.int32)  # expert 0 gets slots 0, 2, 4, 7
    row_map, offsets = routing.module(routing.config(3, 2)).forward(idx.to(DEVICE))
    assert offsets.tolist() == [0, 2, 4, 6]
    assert row_map.tolist() == [0, 2, 1, 4, -1, 3, 5, -1]


def test_ops_dispatch_to_reference_on_cpu_with_autograd():
    T, K, E, D = 6, 2, 4, 5
    idx = _indices(T, K, E, "uniform", torch.Generator().manual_seed(0))
    r_op = routing.module(routing.config(E, 0)).OP
    row_map, offsets = r_op(idx, E, 0)
    assert torch.equal(row_map, moec.runtime.ops.routing.route(idx, E, 0)[0])
    p_op = permute.module(permute.permute_config(torch.float32, K, False)).OP
    u_op = permute.module(permute.unpermute_config(torch.float32, torch.float32, K, False)).OP
    x = torch.randn(T, D, requires_grad=True)
    w = torch.rand(T, K, requires_grad=True)
    out = u_op(p_op(x, row_map, K) * 3, row_map, w)
    ref = moec.runtime.ops.routing.unpermute(moec.runtime.ops.routing.permute(x, row_map, K) * 3, row_map, w)
    assert torch.equal(out, ref)
    gx, gw = torch.autograd.grad(out.square().sum(), (x, w))
    rx, rw = torch.autograd.grad(ref.square().sum(), (x, w))
    assert torch.equal(gx, rx) and torch.equal(gw, rw)


def test_bad_configuration_is_a_user_error():
    with pytest.raises(moec.MoecError):
        permute.permute_config(torch.float64, 2, False)
    with pytest.raises(moec.MoecError):
        routing.config(0, 0)
