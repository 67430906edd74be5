"""The moec:: reference ops against their contract and their own gradients."""
import pytest
import torch

import moec.runtime.ops  # noqa: F401  registers the moec:: ops

ops = torch.ops.moec


def test_gate_breaks_ties_towards_the_lower_expert():
    logits = torch.zeros(3, 6)
    logits[:, 4] = 1.0
    _, idx, counts, _, _ = ops.gate(logits, 3, "softmax", True, None, 1, 1)
    assert idx.tolist() == [[4, 0, 1]] * 3
    assert counts.tolist() == [3, 3, 0, 0, 3, 0]


def test_gate_bias_steers_selection_but_not_weights():
    torch.manual_seed(0)
    logits = torch.randn(8, 5)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 100.0])
    w, idx, *_ = ops.gate(logits, 2, "sigmoid", False, bias, 1, 1)
    assert (idx[:, 0] == 4).all()
    assert torch.allclose(w[:, 0], torch.sigmoid(logits[:, 4]))


def test_group_limited_routing_stays_inside_the_best_groups():
    torch.manual_seed(0)
    logits = torch.randn(32, 16)
    _, idx, *_ = ops.gate(logits, 4, "sigmoid", True, None, 4, 2)
    s = torch.sigmoid(logits).view(32, 4, 4)
    best = s.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices  # [T, 2] groups
    for t in range(32):
        assert set((idx[t] // 4).tolist()) <= set(best[t].tolist())


def test_route_orders_by_expert_then_slot_and_drops_past_capacity():
    idx = torch.tensor([[1, 0], [1, 2], [1, 0]], dtype=torch.int32)
    row_map, offsets = ops.route(idx, 3, 2)
    # expert 0 gets slots 1, 5; expert 1 keeps slots 0, 2 and drops 4; expert 2 gets slot 3
    assert offsets.tolist() == [0, 2, 4, 5]
    assert row_map.tolist() == [2, 0, 3, 4, -1, 1]


def test_dropped_slots_contribute_nothing():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    idx = torch.tensor([[0], [0], [0]], dtype=torch.int32)
    row_map, offsets = ops.route(idx, 2, 2)
    y = ops.permute(x, row_map, 1)
    assert torch.equal(y[2], torch.zeros(4))
    out = ops.unpermute(y, row_map, torch.ones(3, 1))
    assert torch.equal(out[:2], x[:2]) and torch.equal(out[2], torch.zeros(4))


@pytest.mark.parametrize("score,renorm,groups,act,gated,cap", [
    ("softmax", True, 1, "gelu", False, 0), ("softmax", False, 1, "relu", True, 0),
    ("sigmoid", True, 4, "silu", True, 0), ("sigmoid", False, 1, "gelu_tanh", False, 2)])
def test_moe_primitives_gradcheck(score, renorm, groups, act, gated, cap):
    torch.manual_seed(1)
    T, E, K, D, F = 7, 8, 3, 3, 4
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x, logits = torch.randn(T, D, **f64), torch.randn(T, E, **f64)
    w1, w2, b1 = torch.randn(E, F, D, **f64), torch.randn(E, D, F, **f64), torch.randn(E, F, **f64)
    w3 = torch.randn(E, F, D, **f64) if gated else None

    def layer(x, logits, w1, w2, b1, *rest):
        w, i, _, ps, z = ops.gate(logits, K, score, renorm, None, groups, 2 if groups > 1 else 1)
        row_map, offsets = ops.route(i, E, cap)
        h = ops.experts(ops.permute(x, row_map, K), offsets, w1, b1, rest[0] if rest else None, None, w2, None, act)
        out = ops.unpermute(h, row_map, w)
        return (out ** 2).sum() + (ps * torch.arange(E)).sum() + z

    args = (x, logits, w1, w2, b1) + ((w3,) if gated else ())
    assert torch.autograd.gradcheck(layer, args, eps=1e-6, atol=1e-5)


def test_ops_pass_opcheck():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    torch.library.opcheck(ops.gate.default, (logits, 2, "softmax", True, None, 1, 1))
    _, idx, *_ = ops.gate(logits, 2, "softmax", True, None, 1, 1)
    torch.library.opcheck(ops.route.default, (idx, 4, 0))
    row_map, _ = ops.route(idx, 4, 0)
    torch.library.opcheck(ops.permute.default, (torch.randn(6, 3, requires_grad=True), row_map, 2))
    torch.library.opcheck(ops.unpermute.default, (torch.randn(12, 3, requires_grad=True), row_map,
                                                  torch.rand(6, 2, requires_grad=True)))


def test_capacity_is_the_documented_ceiling_for_any_written_factor():
    from decimal import Decimal
    import math

    from hypothesis import given, strategies as st

    from moec.runtime.ops.moe import capacity

    assert capacity(16384, 8, 64, 1.0001) == 2049  # a factor just above 1 keeps one more slot
    assert capacity(10, 1, 1, 1.1) == 11  # 1.1 as written, not the binary float above it

    @given(st.integers(1, 10 ** 6), st.integers(1, 8), st.integers(1, 256), st.decimals("0.01", "8", places=5))
    def check(tokens, k, experts, factor):
        exact = Decimal(tokens * k) * factor / experts
        assert capacity(tokens, k, experts, float(factor)) == math.ceil(exact)

    check()
