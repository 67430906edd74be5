"""Bytes each GPU sends per training step, per collective, and how many
calls that takes (each call pays one alpha), as sympy expressions.

Ring collectives send (n-1)/n of the buffer per pass. Gradients are fp32,
like the parameters (memory.WEIGHT_BYTES); activations b bytes. With ZeRO
0/1 one all-reduce (two passes) after accumulating all M micro-batches; with
ZeRO-2 the sharded gradients are reduce-scattered every micro-batch and the
updated parameters all-gathered once (M + 1 passes); with ZeRO-3 parameters
are also gathered for every forward and backward (3M passes).
"""
import sympy as sp

from moec.cost_model import memory
from moec.cost_model.symbols import B, D, DP, DP_dense, EP, G, K, L, M, PP, R, S, TP, Z, b, f

grad_calls = sp.Piecewise((3 * M, Z >= 3), (M + 1, Z >= 2), (1, True))
_passes = sp.Piecewise((3 * M, Z >= 3), (M + 1, Z >= 2), (2, True))
_moe_layers_local = f * L / PP

# dispatch + combine, forward and backward; uniform routing sends (EP-1)/EP of the copies away
a2a_calls = 4 * _moe_layers_local * M
a2a_volume = a2a_calls * memory.tokens_local * K * G * D * b * (EP - 1) / EP

grad_dense_volume = _passes * (DP_dense - 1) / DP_dense * memory.WEIGHT_BYTES * memory.dense_local
grad_experts_volume = _passes * (DP - 1) / DP * memory.WEIGHT_BYTES * memory.experts_local

# two all-reduces (or reduce-scatter + all-gather with sequence parallelism)
# per layer forward and two backward, two more when the forward is recomputed
tp_calls = (4 + 2 * R) * L / PP * M
tp_volume = tp_calls * 2 * (TP - 1) / TP * S * B * D * b

pp_calls = sp.Piecewise((2 * M, PP > 1), (0, True))
pp_volume = pp_calls * memory.tokens_local * D * b

VOLUMES = {
    "all-to-all (dispatch/combine)": a2a_volume,
    "gradients, dense (EP*DP)": grad_dense_volume,
    "gradients, experts (DP)": grad_experts_volume,
    "tensor parallel": tp_volume,
    "pipeline sends": pp_volume,
}
