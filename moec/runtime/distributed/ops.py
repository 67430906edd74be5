"""moec::dispatch, moec::combine and moec::balance_counts: the collectives of
expert parallelism as custom ops (reference in torch.distributed, fake
kernels, autograd), on the groups moec.runtime.distributed.groups names.

Legend: N rows of the grouped buffer (T*K), M rows this rank's experts
receive (data dependent), D hidden, E experts, P = EP ranks, L = E/P.

dispatch(x [N, D], offsets [E+1]) -> rows [M, D] grouped by local expert,
local offsets [L+1] (what moec::experts takes), and the count matrix C [P, E]
(host, int64) that combine and both backwards replay. combine(y [M, D], C,
n_rows) -> [n_rows, D] in dispatch's input order; rows past offsets[E] come
back zero. Each one's backward is the other's forward: the opposite
all-to-all. With no group registered (one process) both are copies.
"""
import torch
import torch.distributed as dist
from torch import Tensor

from moec.runtime.distributed import exchange, groups


def _plan(C: Tensor, ep_size: int, node_size: int) -> list:
    g = groups.get("ep")
    return exchange.stages(C, dist.get_rank(g) if g is not None else 0, node_size)


def _pad(x: Tensor, n_rows: int) -> Tensor:
    return torch.cat([x, x.new_zeros(n_rows - x.shape[0], *x.shape[1:])]) if x.shape[0] < n_rows else x


@torch.library.custom_op("moec::dispatch", mutates_args=())
def dispatch(x: Tensor, offsets: Tensor, ep_size: int, node_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Send each expert's rows to the rank that holds it (see the module docstring)."""
    n = groups.check_ep("ep", ep_size)
    C = exchange.gather_counts(offsets, n)  # the layer's one host sync
    me = dist.get_rank(groups.get("ep")) if n > 1 else 0
    L = C.shape[1] // n
    mine = C[:, me * L:(me + 1) * L].sum(0)  # [L]
    local = torch.cat([mine.new_zeros(1), torch.cumsum(mine, 0)]).to(device=offsets.device, dtype=offsets.dtype)
    rows = exchange.forward(x[:int(C[me].sum())], _plan(C, n, node_size))
    return rows.clone() if n == 1 else rows, local, C


@dispatch.register_fake
def _(x, offsets, ep_size, node_size):
    m = torch.library.get_ctx().new_dynamic_size()
    E = offsets.shape[0] - 1
    return (x.new_empty(m, x.shape[1]), offsets.new_empty(E // ep_size + 1),
            torch.empty(ep_size, E, dtype=torch.int64, device="cpu"))


@torch.library.custom_op("moec::combine", mutates_args=())
def combine(y: Tensor, counts: Tensor, n_rows: int, ep_size: int, node_size: int) -> Tensor:
    """Bring the experts' output rows back to the ranks that dispatched them."""
    n = groups.check_ep("ep", ep_size)
    out = _pad(exchange.inverse(y, _plan(counts, n, node_size)), n_rows)
    return out.clone() if out is y else out


@combine.register_fake
def _(y, counts, n_rows, ep_size, node_size):
    return y.new_empty(n_rows, y.shape[1])


def _dispatch_setup(ctx, inputs, output):
    x, _, ep_size, node_size = inputs
    ctx.save_for_backward(output[2])
    ctx.n_rows, ctx.ep_size, ctx.node_size = x.shape[0], ep_size, node_size


def _dispatch_bwd(ctx, g_rows, _g_local, _g_counts):
    (C,) = ctx.saved_tensors
    return combine(g_rows.contiguous(), C, ctx.n_rows, ctx.ep_size, ctx.node_size), None, None, None


def _combine_setup(ctx, inputs, output):
    _, C, _, ep_size, node_size = inputs
    ctx.save_for_backward(C)
    ctx.ep_size, ctx.node_size = ep_size, node_size


def _combine_bwd(ctx, g_out):
    (C,) = ctx.saved_tensors
    n = groups.check_ep("ep", ctx.ep_size)
    me = dist.get_rank(groups.get("ep")) if n > 1 else 0
    g = exchange.forward(g_out[:int(C[me].sum())].contiguous(), _plan(C, n, ctx.node_size))
    return g.clone() if n == 1 else g, None, None, None, None


dispatch.register_autograd(_dispatch_bwd, setup_context=_dispatch_setup)
combine.register_autograd(_combine_bwd, setup_context=_combine_setup)


@torch.library.custom_op("moec::balance_counts", mutates_args=())
def balance_counts(counts: Tensor) -> Tensor:
    """counts [E] -> the global batch's per-expert counts (summed over the "data" group), scaled to
    this rank's total: the load-balancing loss then sees the global expert shares, and its mean
    over ranks is the loss of the global batch."""
    total = counts.to(torch.float64)
    g = groups.get("data")
    if g is not None:
        total = total.clone()
        dist.all_reduce(total, group=g)
    return (total * (counts.sum() / total.sum())).to(torch.float32)


@balance_counts.register_fake
def _(counts):
    return counts.new_empty(counts.shape, dtype=torch.float32)
