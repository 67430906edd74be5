"""The MoE layer as ffn_to_moe writes it into the graph (one node, before
lower_moe splits it into the moec:: primitives), and the helpers the graph
calls for capacity and losses.

Legend: T tokens, D hidden, E experts, K top-k.
"""
import operator
from fractions import Fraction

import torch
from torch import Tensor

import moec.runtime.ops.experts  # noqa: F401  registers moec::experts
from moec.runtime.ops.routing import acc, expert_counts  # importing it registers the routing ops

moec_ops = torch.ops.moec


def capacity(tokens: int, k: int, num_experts: int, factor: float) -> int:
    """Slots per expert: ceil(factor * tokens * k / E), in integers so symbolic sizes stay exact. The factor
    is the decimal it is written as (1.1 is 11/10, not the binary float just above it)."""
    f = Fraction(repr(float(factor)))
    return -(-(tokens * k * f.numerator) // (num_experts * f.denominator))


def moe_layer(x: Tensor, logits, bias, hashed, w1: Tensor, b1, w3, b3, w2: Tensor, b2, **kw):
    """x [T, D], router logits [T, E] (None for a hash layer), selection bias [E] or None, hashed: the
    experts [T, K] a hash layer's table gives the tokens, or None; kw: primitives' options
    -> (out [T, D], counts [E], probs_sum [E], zsum [], indices [T, K] or None)."""
    return primitives(lambda fn, args: fn(*args), w1.shape[0], x, logits, bias, hashed, w1, b1, w3, b3, w2, b2, **kw)


def primitives(call, num_experts: int, x, logits, bias, hashed, w1, b1, w3, b3, w2, b2, *, k: int, score: str,
               renorm: bool, weight_scale: float, capacity_factor: float, activation: str, recompute: bool = False,
               force_balance: bool = False, routing: str = "topk"):
    """The MoE layer as the moec:: primitives, each made by call(fn, args): run at once (moe_layer), or added
    to a graph (lower_moe), so the layer node and its lowering are one sequence: gate (its selection bias,
    --force-balance's dealt indices, the weights' scale; a hash layer's fixed_gate) -> route -> permute ->
    experts -> unpermute, or for expert-choice routing expert_choice -> permute -> experts -> unpermute with
    a slot per expert and token."""
    E = num_experts
    parts = lambda t, n: [call(operator.getitem, (t, i)) for i in range(n)]
    if routing == "expert-choice":
        weights, counts, probs_sum, zsum, row_map, offsets = parts(call(expert_choice, (logits, k, capacity_factor)), 6)
        indices, slots = None, E  # [E*C, D] rows used (C tokens per expert), the rest unused
    else:
        gate = (call(fixed_gate, (hashed, E)) if hashed is not None else
                call(moec_ops.gate.default, (logits, k, score, renorm, bias, 1, 1)))
        weights, indices, counts, probs_sum, zsum = parts(gate, 5)
        if force_balance:
            indices, counts = parts(call(balanced_indices, (indices, E)), 2)
        if weight_scale != 1:
            weights = call(torch.ops.aten.mul.Tensor, (weights, weight_scale))
        cap = 0
        if capacity_factor > 0:  # from the token count, symbolic in a graph
            cap = call(capacity, (call(torch.ops.aten.sym_size.int, (x, 0)), k, E, capacity_factor))
        row_map, offsets = parts(call(moec_ops.route.default, (indices, E, cap)), 2)
        slots = k  # [T*K, D]
    y = call(moec_ops.permute.default, (x, row_map, slots))
    h = call(moec_ops.experts.default, (y, offsets, w1, b1, w3, b3, w2, b2, activation, recompute))
    return call(moec_ops.unpermute.default, (h, row_map, weights)), counts, probs_sum, zsum, indices


def fixed_gate(indices: Tensor, num_experts: int):
    """gate's outputs for experts chosen by a table (hash layers): equal weights 1/K, the slots' counts, and
    no router to balance or regularise (zero probs_sum and zsum)."""
    T, K = indices.shape
    weights = torch.full((T, K), 1.0 / K, device=indices.device)
    counts = expert_counts(indices, num_experts)
    zero = torch.zeros((), device=indices.device)
    return weights, indices, counts, torch.zeros(num_experts, device=indices.device), zero


def hash_experts(table: Tensor, token_ids: Tensor) -> Tensor:
    """The [T, K] experts of each token from a hash layer's [V, K] table."""
    return table[token_ids.reshape(-1).long()]


def expert_choice(logits: Tensor, k: int, capacity_factor: float):
    """Expert-choice routing of T tokens over E experts: scores softmax over the experts, each expert takes
    C = capacity(T, k, E, factor or 1) tokens by score (moec::choose_tokens); a token's weights are the
    scores of the experts that took it over their sum (so an upcycled layer starts as the dense FFN for
    every token some expert took; a token none took gets zero). -> (weights [T, E], counts [E],
    probs_sum [E], zsum [], row_map [T*E], offsets [E+1])."""
    T, E = logits.shape
    x = acc(logits)
    scores = torch.softmax(x, -1)
    row_map, offsets = moec_ops.choose_tokens(scores, capacity(T, k, E, capacity_factor or 1.0))
    taken = row_map.view(T, E) >= 0
    picked = torch.where(taken, scores, torch.zeros_like(scores))
    weights = picked / picked.sum(-1, keepdim=True).clamp_min(1e-30)
    counts = (offsets[1:] - offsets[:-1]).to(torch.int32)
    return weights, counts, scores.sum(0), torch.logsumexp(x, -1).pow(2).sum(), row_map, offsets


def balanced_indices(indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """--force-balance: slot s = t*K + j goes to expert s mod E (K <= E distinct experts per token, every
    expert the same share of slots), replacing the router's choice; the gate weights stay."""
    slots = torch.arange(indices.numel(), device=indices.device)
    forced = (slots % num_experts).view(indices.shape).to(torch.int32)
    return forced, expert_counts(forced, num_experts)


def load_balance_loss(counts: Tensor, probs_sum: Tensor, k: int) -> Tensor:
    """Switch/GShard loss E * sum_e f_e * P_e: f_e the share of slots routed to e,
    P_e the mean router probability of e; 1.0 when routing is uniform."""
    slots = counts.sum()
    tokens = slots / k
    return counts.numel() * (counts.float() / slots * probs_sum / tokens).sum()


def z_loss(zsum: Tensor, counts: Tensor, k: int) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return zsum / (counts.sum() / k)


def sequence_balance_loss(logits: Tensor, indices: Tensor, sequences, score: str) -> Tensor:
    """The Switch/GShard loss within each of the batch's sequences (f_e and P_e over its tokens), averaged
    over the sequences: balance that a batch of unlike sequences cannot reach by averaging."""
    T, E = logits.shape
    x = logits.float()
    probs = torch.softmax(x, -1) if score == "softmax" else torch.sigmoid(x)
    probs = probs / probs.sum(-1, keepdim=True)
    P = probs.view(sequences, -1, E).mean(1)  # [B, E]
    picks = indices.long().view(sequences, -1)  # [B, S*K]
    f = torch.zeros(sequences, E, device=logits.device).scatter_add_(1, picks, torch.ones_like(picks, dtype=x.dtype))
    return E * (f / picks.shape[1] * P).sum(-1).mean()
