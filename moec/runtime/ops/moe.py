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


def moe_layer(x: Tensor, logits: Tensor, w1: Tensor, b1, w3, b3, w2: Tensor, b2, *, k: int, score: str,
              renorm: bool, capacity_factor: float, activation: str, recompute: bool = False):
    """x [T, D], router logits [T, E] -> (out [T, D], counts [E], probs_sum [E], zsum [])."""
    weights, indices, counts, probs_sum, zsum = moec_ops.gate(logits, k, score, renorm, None, 1, 1)
    E = w1.shape[0]
    cap = capacity(x.shape[0], k, E, capacity_factor) if capacity_factor > 0 else 0
    row_map, offsets = moec_ops.route(indices, E, cap)
    y = moec_ops.permute(x, row_map, k)  # [T*K, D]
    h = moec_ops.experts(y, offsets, w1, b1, w3, b3, w2, b2, activation, recompute)
    return moec_ops.unpermute(h, row_map, weights), counts, probs_sum, zsum


def load_balance_loss(counts: Tensor, probs_sum: Tensor, k: int) -> Tensor:
    """Switch/GShard loss E * sum_e f_e * P_e: f_e the share of slots routed to e,
    P_e the mean router probability of e; 1.0 when routing is uniform."""
    slots = counts.sum()
    tokens = slots / k
    return counts.numel() * (counts.float() / slots * probs_sum / tokens).sum()


def z_loss(zsum: Tensor, counts: Tensor, k: int) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return zsum / (counts.sum() / k)
