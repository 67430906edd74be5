"""Memory per GPU in bytes, as sympy expressions (symbols.py).

Mixed precision as the emitted train.py runs it: fp32 parameters and
gradients, Adam's two fp32 moments (16 bytes per parameter), bf16 autocast
activations (b bytes). ZeRO stage Z shards the optimizer state (Z >= 1),
gradients (Z >= 2) and parameters (Z = 3) over the data-parallel group: EP*DP
for the dense part, DP for the routed experts.

Activations assume sequence parallelism with TP (every saved tensor is split
by TP) and a fused attention kernel (no S x S scores kept). Per token and
layer they are: attention, its norm input and output, Q, K, V and the
attention output; a dense FFN, its norm input and output and n_W F-wide
intermediates; an MoE layer, fp32 router logits, the K*G routed copies in and
out, n_W - 1 F_e-wide pre-activations per routed expert slot (moec::experts
keeps h1, and h3 when gated, unless R_x) and n_W per shared expert. 1F1B
pipelining keeps min(PP, M) micro-batches in flight on the first stage.
Full recompute (R = 1) keeps only each layer's input, plus one layer rebuilt.
"""
import sympy as sp

from moec.cost_model import params
from moec.cost_model.symbols import (B, D, DP, DP_dense, E, EP, F, F_e, G, H, H_kv, K, L, M, N_s, PP, R, R_x, S, TP,
                                     V, Z, b, define, f, n_W)

WEIGHT_BYTES = 4  # fp32 parameters, and gradients of the same dtype
OPTIMIZER_BYTES = 8  # Adam's m and v


def _shard(group, stage):
    return sp.Piecewise((group, Z >= stage), (1, True))


P_d = define("P_d", params.total - params.experts, "parameters outside the routed experts")
P_x = define("P_x", params.experts, "routed-expert parameters")
dense_local = P_d / (TP * PP)
experts_local = P_x / (EP * TP * PP)

parameters = WEIGHT_BYTES * (dense_local / _shard(DP_dense, 3) + experts_local / _shard(DP, 3))
gradients = WEIGHT_BYTES * (dense_local / _shard(DP_dense, 2) + experts_local / _shard(DP, 2))
optimizer = OPTIMIZER_BYTES * (dense_local / _shard(DP_dense, 1) + experts_local / _shard(DP, 1))

act_attention = define("a_attn", b * D * (4 + 2 * H_kv / H), "attention activation bytes per token")
act_ffn = define("a_ffn", b * (2 * D + n_W * F), "dense FFN activation bytes per token")
act_moe = define("a_moe", b * (2 * D + 2 * K * G * D + (K * G * (n_W - 1) * (1 - R_x) + N_s * n_W) * F_e) + 4 * E * G,
                 "MoE layer activation bytes per token")
act_layer = act_attention + (1 - f) * act_ffn + f * act_moe
act_rebuilt = act_attention + sp.Piecewise((act_moe, f > 0), (act_ffn, True))

tokens_local = S * B / TP
in_flight = sp.Min(PP, M)
activations = (in_flight * tokens_local * (L / PP) * (R * b * D + (1 - R) * act_layer)
               + R * tokens_local * act_rebuilt)
# autocast's bf16 copies of the weights, made in forward and kept for backward
weight_copies = parameters * b / WEIGHT_BYTES
# on the last stage, while the loss backpropagates: the bf16 logits (2 bytes), log-softmax's fp32
# output (4), the gradient arriving at it (4) and the fp32 gradient it produces (4)
LOGIT_BYTES = 14
logits = LOGIT_BYTES * tokens_local * V
# dispatch send and receive buffers of the layer in flight
all_to_all_buffers = sp.Piecewise((2 * tokens_local * K * G * D * b, EP > 1), (0, True))

# The high-water mark. train.py drops the gradients before each forward, so when backward starts
# every activation is alive and almost no gradient is; as backward goes on, gradients appear and
# activations and the weight copies go. Either end can be the peak.
transient = weight_copies + activations + logits + all_to_all_buffers
peak = parameters + optimizer + sp.Max(gradients, transient)

TERMS = {
    "parameters": parameters,
    "gradients": gradients,
    "optimizer state": optimizer,
    "bf16 weight copies": weight_copies,
    "activations": activations,
    "logits": logits,
    "all-to-all buffers": all_to_all_buffers,
}
