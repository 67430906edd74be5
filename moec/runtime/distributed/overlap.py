"""moec::ep_experts: dispatch, experts and combine in one op, in chunks, so the
all-to-all of one chunk overlaps the expert GEMMs of another (flat EP).

Legend: N rows of the grouped buffer, M rows received, D hidden, E experts,
P = EP ranks, L = E/P local experts, C chunks.

Chunk c holds local experts lo_c..hi_c of every rank; its rows travel in one
asynchronous all_to_all_single. Forward: chunk c+1's dispatch is in flight
while chunk c's experts run, and chunk c's combine is in flight while chunk
c+1's run; backward does the same with the gradients. The op keeps the rows
it received (its experts' input) and recomputes the expert activations in
backward, so backward repeats no all-to-all of activations. Every rank issues
the same C all-to-alls per direction, chunk order, whatever the routing.
"""
import torch
import torch.distributed as dist
from torch import Tensor

from moec.runtime.distributed import exchange, groups
from moec.runtime.ops import weight_copies
from moec.runtime.ops.experts import experts_backward, experts_forward


def _chunks(C: Tensor, me: int, chunks: int) -> list:
    """Per chunk: (lo, hi, send row index [host], send splits, recv splits, recv lengths [P, Lc])."""
    P, E = C.shape
    L = E // P
    starts = torch.cumsum(C[me], 0) - C[me]  # [E] first row of each expert in x
    bounds = [L * i // chunks for i in range(chunks + 1)]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        cols = torch.cat([torch.arange(j * L + lo, j * L + hi) for j in range(P)])
        lens = C[me, cols]
        first = starts[cols] - (torch.cumsum(lens, 0) - lens)
        idx = torch.repeat_interleave(first, lens) + torch.arange(int(lens.sum()))
        mine = C[:, me * L + lo:me * L + hi]  # [P, Lc]
        out.append((lo, hi, idx, lens.view(P, -1).sum(1).tolist(), mine.sum(1).tolist(), mine))
    return out


def _a2a(x: Tensor, send: list, recv: list):
    out = x.new_empty(sum(recv), *x.shape[1:])
    return out, dist.all_to_all_single(out, x.contiguous(), recv, send, group=groups.get("ep"), async_op=True)


def _pipeline(src: Tensor, plans: list, compute) -> Tensor:
    """Send src's chunk rows to the experts, compute(c, rows) there, bring the results back (overlapped)."""
    dev = src.device
    sends = [_a2a(src[p[2].to(dev)], p[3], p[4]) if i == 0 else None for i, p in enumerate(plans)]
    backs = []
    for c, (lo, hi, idx, send, recv, mine) in enumerate(plans):
        rows, work = sends[c]
        work.wait()
        if c + 1 < len(plans):
            nxt = plans[c + 1]
            sends[c + 1] = _a2a(src[nxt[2].to(dev)], nxt[3], nxt[4])
        y = exchange.reorder(compute(c, exchange.reorder(rows, mine)), mine.t())
        backs.append((idx, *_a2a(y, recv, send)))
    out = src.new_zeros(src.shape[0], *backs[0][1].shape[1:]) if backs else src.new_zeros(src.shape)
    for idx, y, work in backs:
        work.wait()
        out[idx.to(dev)] = y
    return out


def _local_offsets(mine: Tensor, like: Tensor) -> Tensor:
    per = mine.sum(0)
    return torch.cat([per.new_zeros(1), torch.cumsum(per, 0)]).to(device=like.device, dtype=like.dtype)


def _pick(t, lo, hi):
    return None if t is None else t[lo:hi]


@torch.library.custom_op("moec::ep_experts", mutates_args=())
def ep_experts(x: Tensor, offsets: Tensor, w1: Tensor, b1: Tensor | None, w3: Tensor | None, b3: Tensor | None,
               w2: Tensor, b2: Tensor | None, activation: str, ep_size: int,
               chunks: int) -> tuple[Tensor, Tensor, Tensor]:
    """x [N, D] grouped by global expert -> out [N, D]; for backward the rows this rank's experts
    received [M, D] (chunk by chunk, each grouped by local expert) and the count matrix C [P, E]."""
    n = groups.check_ep("ep", ep_size)
    C = exchange.gather_counts(offsets, n)  # the layer's one host sync
    if n == 1:
        rows = x[:int(C[0].sum())]
        out = experts_forward(rows, offsets, w1, b1, w3, b3, w2, b2, activation, False, "auto")[0]
        return torch.cat([out, out.new_zeros(x.shape[0] - rows.shape[0], out.shape[1])]), rows.clone(), C
    plans = _chunks(C, dist.get_rank(groups.get("ep")), min(chunks, C.shape[1] // n))
    kept = []

    def compute(c, rows):
        lo, hi, *_, mine = plans[c]
        kept.append(rows)
        return experts_forward(rows, _local_offsets(mine, offsets), w1[lo:hi], _pick(b1, lo, hi), _pick(w3, lo, hi),
                               _pick(b3, lo, hi), w2[lo:hi], _pick(b2, lo, hi), activation, False, "auto")[0]
    out = _pipeline(x, plans, compute)
    return out, torch.cat(kept), C


@ep_experts.register_fake
def _(x, offsets, w1, b1, w3, b3, w2, b2, activation, ep_size, chunks):
    m = torch.library.get_ctx().new_dynamic_size()
    E = offsets.shape[0] - 1
    return (x.new_empty(x.shape[0], w2.shape[1]), x.new_empty(m, x.shape[1]),
            torch.empty(ep_size, E, dtype=torch.int64, device="cpu"))


def _setup(ctx, inputs, output):
    x, offsets, w1, b1, w3, b3, w2, b2, activation, ep_size, chunks = inputs
    ctx.save_for_backward(offsets, w1, b1, w3, b3, w2, b2, output[1], output[2])
    ctx.activation, ctx.ep_size, ctx.chunks, ctx.n_rows = activation, ep_size, chunks, x.shape[0]


def _backward(ctx, g_out, _g_rows, _g_counts):
    offsets, w1, b1, w3, b3, w2, b2, rows, C = ctx.saved_tensors
    weights = (w1, b1, w3, b3, w2, b2)
    n = groups.check_ep("ep", ctx.ep_size)
    g_out = g_out.contiguous()
    if n == 1:
        g = experts_backward(g_out[:rows.shape[0]], rows, offsets, *weights, ctx.activation)
        g_x = torch.cat([g[0], g[0].new_zeros(ctx.n_rows - rows.shape[0], g[0].shape[1])])
        return (g_x, None, *[gi if t is not None else None for t, gi in zip(weights, g[1:])], None, None, None)
    plans = _chunks(C, dist.get_rank(groups.get("ep")), min(ctx.chunks, C.shape[1] // n))
    grads = [None if t is None else torch.zeros_like(t) for t in weights]
    firsts = [0]
    for *_, mine in plans:
        firsts.append(firsts[-1] + int(mine.sum()))

    def compute(c, g_rows):
        lo, hi, *_, mine = plans[c]
        ws = [None if t is None else t[lo:hi] for t in weights]
        g = experts_backward(g_rows, rows[firsts[c]:firsts[c + 1]], _local_offsets(mine, offsets), *ws,
                             ctx.activation)
        for acc, gi in zip(grads, g[1:]):
            if acc is not None:
                acc[lo:hi] = gi
        return g[0]
    g_x = _pipeline(g_out, plans, compute)
    return (g_x, None, *grads, None, None, None)


ep_experts.register_autograd(_backward, setup_context=_setup)
# Under CUDA autocast the expert GEMMs run in bf16, as moec::experts does.
weight_copies.register_autocast("moec::ep_experts", "cuda", torch.bfloat16)
