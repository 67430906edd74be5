"""The moec:: custom ops: reference implementations in plain torch (the ground
truth on every device), fake kernels for capture and shape propagation, and
autograd formulas.

Legend: T tokens, D hidden, F expert ffn width, E experts, K top-k,
N = T*K rows of the expert-grouped buffer.

Routing contract, shared by every backend:
- gate: scores are softmax(logits) or sigmoid(logits), computed in fp32.
  Selection ranks `scores + bias` (bias only steers selection, as in
  aux-loss-free balancing) in descending order; equal values rank the lower
  expert index first. With n_group > 1 (DeepSeek-V3 group-limited routing)
  each group is scored by the sum of its two best selection scores, the
  topk_group best groups are kept (ties: lower group first) and the top-k is
  taken within them. Weights are the scores of the chosen experts, divided by
  their sum when renorm is set.
- route: slot s = t*K + k goes to expert indices[t, k]. Rows of the grouped
  buffer are ordered by expert, then by slot. With capacity C > 0 an expert
  keeps its first C slots in that order and drops the rest (row_map = -1);
  offsets are prefix sums of the kept counts, so rows past offsets[E] are
  unused (zero after permute, zero out of experts).
"""
from typing import Optional

import torch
from torch import Tensor

SCORES = ("softmax", "sigmoid")


def acc(t: Tensor) -> Tensor:
    """t in its accumulation dtype: fp32 for 16- and 32-bit floats, fp64 stays fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def expert_counts(indices: Tensor, num_experts: int) -> Tensor:
    """Slots per expert [E] i32 of expert indices of any shape. A scatter, not torch.bincount: bincount's
    CUDA kernel reads the largest index back to the host to size its output, a sync in every step."""
    flat = indices.reshape(-1).long()
    ones = torch.ones_like(flat, dtype=torch.int32)
    return torch.zeros(num_experts, dtype=torch.int32, device=flat.device).scatter_add_(0, flat, ones)


def _scores(logits: Tensor, score: str) -> Tensor:
    x = acc(logits)
    return torch.softmax(x, dim=-1) if score == "softmax" else torch.sigmoid(x)


def select_experts(scores: Tensor, k: int, bias: Optional[Tensor], n_group: int, topk_group: int) -> Tensor:
    """Indices [T, K] (int64) of the chosen experts, by the contract above."""
    sel = scores if bias is None else scores + bias.to(scores.dtype)
    T, E = sel.shape
    if n_group > 1:
        g = sel.view(T, n_group, E // n_group)
        top2 = torch.sort(g, dim=-1, descending=True, stable=True).values[..., :2].sum(-1)  # [T, G]
        keep = torch.sort(top2, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        mask = torch.zeros(T, n_group, dtype=torch.bool, device=sel.device).scatter_(1, keep, True)
        sel = sel.masked_fill(~mask.repeat_interleave(E // n_group, dim=1), float("-inf"))
    return torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :k]


def _gate_values(logits: Tensor, indices: Tensor, score: str, renorm: bool):
    """The differentiable outputs of gate for fixed indices."""
    scores = _scores(logits, score)  # [T, E]
    weights = scores.gather(1, indices)  # [T, K]
    if renorm:
        weights = weights / weights.sum(-1, keepdim=True)
    probs = scores if score == "softmax" else scores / scores.sum(-1, keepdim=True)
    probs_sum = probs.sum(0)  # [E]
    zsum = torch.logsumexp(acc(logits), dim=-1).pow(2).sum()
    return weights, probs_sum, zsum


@torch.library.custom_op("moec::gate", mutates_args=())
def gate(logits: Tensor, k: int, score: str, renorm: bool, bias: Optional[Tensor],
         n_group: int, topk_group: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Router logits [T, E] -> weights [T, K] f32, indices [T, K] i32,
    counts [E] i32 (slots per expert), probs_sum [E] f32 (sum over tokens of the
    normalised scores, for the load-balancing loss), zsum [] f32 (sum over
    tokens of logsumexp(logits)^2, for the z-loss)."""
    E = logits.shape[-1]
    indices = select_experts(_scores(logits, score), k, bias, n_group, topk_group)
    weights, probs_sum, zsum = _gate_values(logits, indices, score, renorm)
    return weights, indices.to(torch.int32), expert_counts(indices, E), probs_sum, zsum


@gate.register_fake
def _(logits, k, score, renorm, bias, n_group, topk_group):
    T, E = logits.shape
    f = logits.new_empty
    return (f(T, k, dtype=torch.float32), f(T, k, dtype=torch.int32), f(E, dtype=torch.int32),
            f(E, dtype=torch.float32), f((), dtype=torch.float32))


@torch.library.custom_op("moec::gate_backward", mutates_args=())
def gate_backward(logits: Tensor, indices: Tensor, score: str, renorm: bool, g_weights: Tensor,
                  g_probs_sum: Tensor, g_zsum: Tensor) -> Tensor:
    """Gradient of gate's differentiable outputs (weights, probs_sum, zsum) with respect to the logits."""
    x = acc(logits)
    s = _scores(x, score)  # [T, E]
    idx = indices.long()
    picked = s.gather(1, idx)  # [T, K]
    gw = acc(g_weights)
    if renorm:
        total = picked.sum(-1, keepdim=True)
        gw = (gw - (gw * picked).sum(-1, keepdim=True) / total) / total
    g_s = torch.zeros_like(s).scatter_add_(1, idx, gw)
    if score == "softmax":
        g_s = g_s + g_probs_sum
        g = s * (g_s - (g_s * s).sum(-1, keepdim=True))
    else:
        total = s.sum(-1, keepdim=True)
        gp = g_probs_sum
        g_s = g_s + (gp - (gp * s / total).sum(-1, keepdim=True)) / total
        g = g_s * s * (1 - s)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    g = g + 2 * g_zsum * lse * torch.softmax(x, dim=-1)
    return g.to(logits.dtype)


@gate_backward.register_fake
def _(logits, indices, score, renorm, g_weights, g_probs_sum, g_zsum):
    return torch.empty_like(logits)


def _gate_setup(ctx, inputs, output):
    logits, _, score, renorm = inputs[:4]
    ctx.save_for_backward(logits, output[1])
    ctx.score, ctx.renorm = score, renorm


def _gate_bwd(ctx, g_weights, _gi, _gc, g_probs_sum, g_zsum):
    logits, indices = ctx.saved_tensors
    g = gate_backward(logits, indices, ctx.score, ctx.renorm, g_weights, g_probs_sum, g_zsum)
    return g, None, None, None, None, None, None


gate.register_autograd(_gate_bwd, setup_context=_gate_setup)


@torch.library.custom_op("moec::route", mutates_args=())
def route(indices: Tensor, num_experts: int, capacity: int) -> tuple[Tensor, Tensor]:
    """indices [T, K] -> row_map [T*K] i32 (buffer row of each slot, -1 if
    dropped), offsets [E+1] i32 (start row of each expert, kept rows only)."""
    flat = indices.flatten().long()  # [N]
    order = torch.sort(flat, stable=True).indices  # slots grouped by expert, slot order inside
    counts = expert_counts(flat, num_experts).long()
    starts = torch.cumsum(counts, 0) - counts  # [E]
    pos = torch.empty_like(flat)
    pos[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # rank inside expert
    kept = counts if capacity <= 0 else counts.clamp(max=capacity)
    offsets = torch.cat([kept.new_zeros(1), torch.cumsum(kept, 0)])
    row = offsets[flat] + pos
    row_map = torch.where(pos < kept[flat], row, torch.full_like(row, -1))
    return row_map.to(torch.int32), offsets.to(torch.int32)


@route.register_fake
def _(indices, num_experts, capacity):
    n = indices.numel()
    return indices.new_empty(n, dtype=torch.int32), indices.new_empty(num_experts + 1, dtype=torch.int32)


@torch.library.custom_op("moec::choose_tokens", mutates_args=())
def choose_tokens(scores: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """Expert-choice routing: expert e takes the `capacity` tokens with the highest scores[:, e] (ties: the
    lower token first). scores [T, E] -> row_map [T*E] i32 (slot t*E+e: buffer row, -1 if e did not take
    t), offsets [E+1] i32; rows ordered by expert, then by token, as route orders them."""
    T, E = scores.shape
    c = min(capacity, T)
    order = torch.sort(acc(scores).t(), dim=-1, descending=True, stable=True).indices[:, :c]  # [E, c]
    taken = torch.zeros(E, T, dtype=torch.bool, device=scores.device).scatter_(1, order, True)
    rank = torch.cumsum(taken.to(torch.int64), 1) - 1  # row of each taken token inside its expert
    starts = torch.arange(E, device=scores.device)[:, None] * c
    rows = torch.where(taken, starts + rank, torch.full_like(rank, -1))  # [E, T]
    offsets = torch.arange(E + 1, device=scores.device) * c
    return rows.t().reshape(-1).to(torch.int32), offsets.to(torch.int32)


@choose_tokens.register_fake
def _(scores, capacity):
    T, E = scores.shape
    return scores.new_empty(T * E, dtype=torch.int32), scores.new_empty(E + 1, dtype=torch.int32)


@torch.library.custom_op("moec::permute", mutates_args=())
def permute(x: Tensor, row_map: Tensor, k: int) -> Tensor:
    """tokens [T, D] -> expert-grouped buffer [T*K, D]; row row_map[t*K+j] = x[t]."""
    T, D = x.shape
    N = T * k
    out = x.new_zeros(N + 1, D)  # row N takes the dropped slots: a mask would size the copy on the host
    src = torch.arange(N, device=x.device) // k
    out[torch.where(row_map >= 0, row_map, N).long()] = x[src]
    return out[:N]


@permute.register_fake
def _(x, row_map, k):
    return x.new_empty(x.shape[0] * k, x.shape[1])


@torch.library.custom_op("moec::unpermute", mutates_args=())
def unpermute(y: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
    """buffer [T*K, D], weights [T, K] -> out [T, D] = sum_k weights[t,k] * y[row_map[t*K+k]]
    accumulated in fp32; dropped slots add nothing."""
    T, K = weights.shape
    rows = row_map.view(T, K).long()
    g = acc(y[rows.clamp(min=0)])  # [T, K, D]
    w = torch.where(rows >= 0, acc(weights), 0).to(g.dtype)
    return torch.einsum("tkd,tk->td", g, w).to(y.dtype)


@unpermute.register_fake
def _(y, row_map, weights):
    return y.new_empty(weights.shape[0], y.shape[1])


def _permute_setup(ctx, inputs, output):
    _, row_map, k = inputs
    ctx.save_for_backward(row_map)
    ctx.k = k


def permute_backward(g_out: Tensor, row_map: Tensor, k: int) -> Tensor:
    """Gradient of permute: unpermute with every slot weight one."""
    w = torch.ones(row_map.numel() // k, k, device=g_out.device, dtype=acc(g_out).dtype)
    return unpermute(g_out, row_map, w)


def _permute_bwd(ctx, g_out):
    (row_map,) = ctx.saved_tensors
    return permute_backward(g_out, row_map, ctx.k), None, None


permute.register_autograd(_permute_bwd, setup_context=_permute_setup)
# Under CUDA autocast the experts run in bf16 (moec.runtime.ops.experts): cast the T tokens once here,
# before permute copies each K times, rather than the T*K rows after it (and send half the bytes to
# other ranks under expert parallelism).
permute.register_autocast("cuda", torch.bfloat16)


def _unpermute_setup(ctx, inputs, output):
    y, row_map, weights = inputs
    ctx.save_for_backward(y, row_map, weights)


def _unpermute_bwd(ctx, g_out):
    y, row_map, weights = ctx.saved_tensors
    g_y, g_w = unpermute_backward(g_out, y, row_map, weights)
    return g_y, None, g_w


@torch.library.custom_op("moec::unpermute_backward", mutates_args=())
def unpermute_backward(g_out: Tensor, y: Tensor, row_map: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """g_y[row_map[t*K+k]] = weights[t,k] * g_out[t]; g_weights[t,k] = <g_out[t], y[row_map[t*K+k]]>."""
    T, K = weights.shape
    rows = row_map.view(T, K).long()
    valid = rows >= 0
    N = y.shape[0]
    g_y = y.new_zeros(N + 1, y.shape[1])  # row N takes the dropped slots, as in permute
    scaled = (acc(g_out).unsqueeze(1) * acc(weights).unsqueeze(-1)).to(y.dtype)  # [T, K, D]
    g_y[torch.where(valid, rows, N).flatten()] = scaled.flatten(0, 1)
    g_y = g_y[:N]
    g_w = torch.einsum("td,tkd->tk", acc(g_out), acc(y[rows.clamp(min=0)]))
    return g_y, torch.where(valid, g_w, torch.zeros_like(g_w)).to(weights.dtype)


@unpermute_backward.register_fake
def _(g_out, y, row_map, weights):
    return torch.empty_like(y), torch.empty_like(weights)


unpermute.register_autograd(_unpermute_bwd, setup_context=_unpermute_setup)
