"""Memory per GPU in bytes, as sympy expressions (symbols.py).

Mixed precision as the emitted train.py runs it: fp32 parameters and
gradients, Adam's two fp32 moments (16 bytes per parameter), bf16 autocast
activations (b bytes). ZeRO stage Z shards the optimizer state (Z >= 1),
gradients (Z >= 2) and parameters (Z = 3) over the data-parallel group: EP*DP
for the dense part, DP for the routed experts.

Tensor parallelism is the training program's: Megatron's column/row split of
attention (by heads), dense FFNs and shared experts. A TP rank holds 1/TP of
those weights; the router, the embeddings and head, and the routed experts
(sharded by EP alone; the ranks of a TP group hold the same ones) are whole
on every TP rank. Without sequence parallelism every TP rank runs all S*B
tokens of its micro-batch, so activations outside the split linears (the
residual stream, norms, router, routed copies and expert pre-activations,
logits) are whole too, and only those between a column- and a row-parallel
linear divide by TP. With it (Q = 1) a TP rank holds 1/TP of the tokens
outside the split linears (the share tp_share): the norms' inputs, the
router, the routed copies and the experts' pre-activations divide by TP; what
a column-parallel linear keeps of its input is the gathered whole, and the
logits are gathered before the head.

Activations assume a fused attention kernel (no S x S scores kept). Per token
and layer they are: attention, its norm input and output, Q, K, V and the
attention output; a dense FFN, its norm input and output and n_W F-wide
intermediates; an MoE layer, fp32 router logits, the K*G routed copies in and
out, n_W - 1 F_e-wide pre-activations per routed expert slot (moec::experts
keeps h1, and h3 when gated, unless R_x) and n_W per shared expert. 1F1B
pipelining keeps min(PP, M) micro-batches in flight on the first stage.
Full recompute (R = 1) keeps only each layer's input (and an MoE layer's router
input), plus one layer rebuilt.
"""
import sympy as sp

from moec.cost_model import params
from moec.cost_model.symbols import (B, D, DP, DP_dense, E, EP, F, F_e, G, H, H_kv, K, L, M, N_s, PP, Q, R, R_x, S, TP,
                                     V, Z, b, define, f, n_W)

WEIGHT_BYTES = 4  # fp32 parameters, and gradients of the same dtype
OPTIMIZER_BYTES = 8  # Adam's m and v


def _shard(group, stage):
    return sp.Piecewise((group, Z >= stage), (1, True))


P_d = define("P_d", params.total - params.experts, "parameters outside the routed experts")
P_t = define("P_t", params.tp_split, "parameters TP splits: attention, dense FFNs, shared experts")
P_x = define("P_x", params.experts, "routed-expert parameters")
# TP splits P_t; the rest of P_d (routers, embeddings, head) is whole on every TP rank
dense_local = (P_d - P_t + P_t / TP) / PP
# routed experts are sharded by EP only: the TP ranks of a group hold the same experts
experts_local = P_x / (EP * PP)

parameters = WEIGHT_BYTES * (dense_local / _shard(DP_dense, 3) + experts_local / _shard(DP, 3))
gradients = WEIGHT_BYTES * (dense_local / _shard(DP_dense, 2) + experts_local / _shard(DP, 2))
optimizer = OPTIMIZER_BYTES * (dense_local / _shard(DP_dense, 1) + experts_local / _shard(DP, 1))

# the share of a micro-batch's tokens a TP rank holds outside the split linears: all of them, or 1/TP
# with sequence parallelism
tp_share = define("s_tp", 1 - Q + Q / TP, "share of the tokens a TP rank holds on the residual stream")
# Per token on one TP rank. The norm's input (the residual stream, D) is this rank's share of the tokens; its
# output, as the column-parallel linears keep it, is whole (gathered under sequence parallelism); Q, K, V and
# the attention output are this rank's heads (1/TP).
act_attention = define("a_attn", b * D * (tp_share + 1 + (2 + 2 * H_kv / H) / TP),
                       "attention activation bytes per token")
# the norm's input a share, its output whole, the n_W F-wide intermediates between the column- and
# row-parallel linears split
act_ffn = define("a_ffn", b * (D * tp_share + D + n_W * F / TP), "dense FFN activation bytes per token")
# the router and the routed experts run on this rank's share of the tokens (all of them without sequence
# parallelism); the shared experts keep their gathered input and split their intermediates
act_moe = define("a_moe", (b * (2 * D + 2 * K * G * D + K * G * (n_W - 1) * (1 - R_x) * F_e) + 4 * E * G) * tp_share
                 + b * (Q * sp.Min(N_s, 1) * D + N_s * n_W * F_e / TP), "MoE layer activation bytes per token")
act_layer = act_attention + (1 - f) * act_ffn + f * act_moe
act_rebuilt = act_attention + sp.Piecewise((act_moe, f > 0), (act_ffn, True))

# the micro-batch's tokens; every TP rank runs them all (its share of them on the residual stream)
tokens_local = S * B
in_flight = sp.Min(PP, M)
# Full recompute keeps each layer's input, the residual stream (fp32 under autocast: RESIDUAL_BYTES), and of
# an MoE layer the router input the forward returns for the bias refit (the norm's fp32 output, which without
# recompute is the tensor the router saves anyway); a share of the tokens each under sequence parallelism.
RESIDUAL_BYTES = 4
kept_input = RESIDUAL_BYTES * D * tp_share
kept_router_input = RESIDUAL_BYTES * D * tp_share
activations = (in_flight * tokens_local * (L / PP) * (R * (kept_input + f * kept_router_input) + (1 - R) * act_layer)
               + R * tokens_local * act_rebuilt)
# autocast's bf16 copies of the weights, made in forward and kept for backward
weight_copies = parameters * b / WEIGHT_BYTES
# on the last stage, while the loss backpropagates: the bf16 logits (2 bytes), log-softmax's fp32
# output (4), the gradient arriving at it (4) and the fp32 gradient it produces (4)
LOGIT_BYTES = 14
logits = LOGIT_BYTES * tokens_local * V
# dispatch send and receive buffers of the layer in flight
all_to_all_buffers = sp.Piecewise((2 * tokens_local * tp_share * K * G * D * b, EP > 1), (0, True))

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
