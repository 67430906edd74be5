"""The MoE layer needs nothing from the host: no value read back (.item(), .tolist(), int(t)) and no
shape that depends on data (nonzero, boolean-mask indexing, bincount); on a GPU each is a sync. Fake
tensors without a shape environment hold no data and refuse every such op, so running code on them is a
check on CPU for what would sync a GPU (dynamo's fullgraph is not one: it captures them as unbacked
sizes). The reference bodies of the moec:: routing ops are checked themselves (under fake tensors a
custom op runs its fake kernel), then the layer as the graph calls it, forward and backward; and the
layer compiles into one graph, as train.py --compile runs it."""
import pytest
import torch
import torch._dynamo
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from moec.runtime.ops import moe, routing

T, D, F, E, K = 24, 8, 16, 4, 2


def _no_host_reads(fn, *args):
    """fn(*args), after running it on fake copies of args, which fails on any host read."""
    mode = FakeTensorMode()
    fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        fn(*fakes)
    return fn(*args)


@pytest.mark.parametrize("read", [lambda i: torch.bincount(i, minlength=E), lambda i: i[i > 1],
                                  lambda i: torch.zeros(int(i.max()))])
def test_the_check_catches_host_reads(read):
    with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)):
        _no_host_reads(read, torch.randint(0, E, (T,)))


def _logits():
    return torch.randn(T, E, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("capacity", [0, 5])
def test_routing_references_read_nothing_back(capacity):
    logits, x = _logits(), torch.randn(T, D)
    weights, indices, counts, probs_sum, zsum = routing.gate._init_fn(logits, K, "softmax", True, None, 1, 1)
    want = torch.bincount(indices.flatten(), minlength=E).int()
    assert torch.equal(counts, want) and torch.equal(_no_host_reads(routing.expert_counts, indices, E), want)
    g = routing.gate_backward._init_fn
    _no_host_reads(g, logits, indices, "sigmoid", True, torch.ones_like(weights), probs_sum, zsum)
    row_map, offsets = _no_host_reads(routing.route._init_fn, indices, E, capacity)
    kept = row_map >= 0
    expert = indices.flatten().long()[kept]
    assert ((offsets[expert] <= row_map[kept]) & (row_map[kept] < offsets[expert + 1])).all()
    assert (~kept).any() == (capacity > 0)  # 48 slots over 4 experts: some expert gets more than 5
    y = _no_host_reads(routing.permute._init_fn, x, row_map, K)
    torch.testing.assert_close(y[row_map[kept].long()], x.repeat_interleave(K, 0)[kept])
    assert (y[int(offsets[-1]):] == 0).all()  # rows past the kept ones stay zero
    _no_host_reads(routing.unpermute._init_fn, y, row_map, weights)
    g_y, g_w = _no_host_reads(routing.unpermute_backward._init_fn, torch.randn(T, D), y, row_map, weights)
    assert g_y.shape == y.shape and (g_y[int(offsets[-1]):] == 0).all()
    assert (g_w.flatten()[~kept] == 0).all()
    _no_host_reads(routing.choose_tokens._init_fn, torch.softmax(logits, -1), 6)


def test_layer_helpers_read_nothing_back():
    indices = torch.randint(0, E, (T, K))
    _, _, counts, _, _ = _no_host_reads(moe.fixed_gate, indices, E)
    torch.testing.assert_close(counts, torch.bincount(indices.flatten(), minlength=E).int())
    forced, counts = _no_host_reads(moe.balanced_indices, indices, E)
    assert (counts == T * K // E).all()
    _no_host_reads(moe.expert_choice, _logits(), K, 1.0)


@pytest.mark.parametrize("variant", ["dropless", "capacity", "force_balance", "expert_choice", "hash"])
def test_moe_layer_compiles_whole_forward_and_backward(variant):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    logits = torch.randn(T, E, generator=g, requires_grad=True)
    w1, w3 = (torch.randn(E, F, D, generator=g, requires_grad=True) for _ in range(2))
    w2 = torch.randn(E, D, F, generator=g, requires_grad=True)
    hashed = torch.randint(0, E, (T, K), generator=g).int() if variant == "hash" else None
    kw = dict(k=K, score="softmax", renorm=True, weight_scale=1.0, activation="silu",
              capacity_factor=1.0 if variant in ("capacity", "expert_choice") else 0.0,
              force_balance=variant == "force_balance",
              routing="expert-choice" if variant == "expert_choice" else "topk")

    def layer(x, logits, w1, w3, w2, hashed=None):
        out, counts, probs_sum, zsum, _ = moe.moe_layer(x, None if hashed is not None else logits, None, hashed,
                                                        w1, None, w3, None, w2, None, **kw)
        return out.square().sum() + moe.load_balance_loss(counts, probs_sum, K) + moe.z_loss(zsum, counts, K)

    args = (x, logits, w1, w3, w2) + ((hashed,) if hashed is not None else ())
    wrt = [i for i, a in enumerate(args) if a.requires_grad and (a is not logits or hashed is None)]
    grad = lambda *a: torch.autograd.grad(layer(*a), [a[i] for i in wrt])
    want = _no_host_reads(grad, *args)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*args), [args[i] for i in wrt])
    torch.testing.assert_close(got, want)
