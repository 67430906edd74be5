"""The MoE layer as ffn_to_moe writes it into the graph (one node, before
lower_moe splits it into the moec:: primitives), and the helpers the graph
calls for capacity and losses.

Legend: T tokens, D hidden, E experts, K top-k.
"""
from fractions import Fraction

import torch
from torch import Tensor

import moec.runtime.ops.experts  # noqa: F401  registers moec::experts
import moec.runtime.ops.routing  # noqa: F401  registers the routing ops

moec_ops = torch.ops.moec


def capacity(tokens: int, k: int, num_experts: int, factor: float) -> int:
    """Slots per expert: ceil(factor * tokens * k / E), in integers so symbolic sizes stay exact. The factor
    is the decimal it is written as (1.1 is 11/10, not the binary float just above it)."""
    f = Fraction(repr(float(factor)))
    return -(-(tokens * k * f.numerator) // (num_experts * f.denominator))


def moe_layer(x: Tensor, logits: Tensor, bias, w1: Tensor, b1, w3, b3, w2: Tensor, b2, *, k: int, score: str,
              renorm: bool, weight_scale: float, capacity_factor: float, activation: str, recompute: bool = False,
              force_balance: bool = False):
    """x [T, D], router logits [T, E], selection bias [E] or None
    -> (out [T, D], counts [E], probs_sum [E], zsum [], indices [T, K])."""
    weights, indices, counts, probs_sum, zsum = moec_ops.gate(logits, k, score, renorm, bias, 1, 1)
    E = w1.shape[0]
    if force_balance:
        indices, counts = balanced_indices(indices, E)
    if weight_scale != 1:
        weights = weights * weight_scale
    cap = capacity(x.shape[0], k, E, capacity_factor) if capacity_factor > 0 else 0
    row_map, offsets = moec_ops.route(indices, E, cap)
    y = moec_ops.permute(x, row_map, k)  # [T*K, D]
    h = moec_ops.experts(y, offsets, w1, b1, w3, b3, w2, b2, activation, recompute)
    return moec_ops.unpermute(h, row_map, weights), counts, probs_sum, zsum, indices


def balanced_indices(indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """--force-balance: slot s = t*K + j goes to expert s mod E (K <= E distinct experts per token, every
    expert the same share of slots), replacing the router's choice; the gate weights stay."""
    slots = torch.arange(indices.numel(), device=indices.device)
    forced = (slots % num_experts).view(indices.shape).to(torch.int32)
    return forced, torch.bincount(slots % num_experts, minlength=num_experts).to(torch.int32)


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
