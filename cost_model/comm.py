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
from moec.cost_model.symbols import B, D, DP, DP_dense, EP, G, K, L, M, N_s, PP, R, S, TP, Z, b, define, f

grad_calls = sp.Piecewise((3 * M, Z >= 3), (M + 1, Z >= 2), (1, True))
_passes = sp.Piecewise((3 * M, Z >= 3), (M + 1, Z >= 2), (2, True))
_moe_layers_local = f * L / PP

# dispatch + combine, forward and backward (and forward again under full recompute, which reruns the whole
# layer); uniform routing sends (EP-1)/EP of the copies away
a2a_calls = (4 + 2 * R) * _moe_layers_local * M
a2a_volume = a2a_calls * memory.tokens_local * memory.tp_share * K * G * D * b * (EP - 1) / EP

grad_dense_volume = _passes * (DP_dense - 1) / DP_dense * memory.WEIGHT_BYTES * memory.dense_local
grad_experts_volume = _passes * (DP - 1) / DP * memory.WEIGHT_BYTES * memory.experts_local

# TP regions (a column-parallel entry, a row-parallel exit) per layer: the attention, and the dense FFN of a
# dense layer or the shared experts of an MoE layer that has them (the router and routed experts are not split)
tp_regions = define("n_tp", L / PP * (1 + (1 - f) + f * sp.Min(N_s, 1)), "TP-split regions per stage")
# Each region all-reduces once in forward (the row-parallel output, summed over TP: bf16, b bytes) and once in
# backward (the gradient of the column-parallel input: the norm's output, fp32 under autocast, 4 bytes), and
# once more in forward when full recompute runs it again. Every all-reduce carries all S*B*D elements of the
# micro-batch, and a ring sends 2 (TP - 1) / TP of them; sequence parallelism's reduce-scatter and all-gather
# in its place send (TP - 1) / TP each, the same.
TP_GRAD_BYTES = 4
tp_calls = (2 + R) * tp_regions * M
tp_volume = tp_regions * M * ((1 + R) * b + TP_GRAD_BYTES) * 2 * (TP - 1) / TP * S * B * D

pp_calls = sp.Piecewise((2 * M, PP > 1), (0, True))
pp_volume = pp_calls * memory.tokens_local * D * b

VOLUMES = {
    "all-to-all (dispatch/combine)": a2a_volume,
    "gradients, dense (EP*DP)": grad_dense_volume,
    "gradients, experts (DP)": grad_experts_volume,
    "tensor parallel": tp_volume,
    "pipeline sends": pp_volume,
}
