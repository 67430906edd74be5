"""Parameter counts and FLOPs per token, as sympy expressions (symbols.py).

Counted: attention projections, FFNs and experts, routers, embeddings and the
output head. Not counted: norms, biases and learned position tables (under
0.1 % of the sizes modelled here). Head width is D/H, so K and V project to
D*H_kv/H.

With F = 4D, plain FFN (n_W = 2), MHA, G = 1 and no shared experts, the
blocks come to 4 L D^2 (3 + 2 f E - 2 f): the DeepSpeed-MoE sizing.
"""
from moec.cost_model.symbols import D, E, F, F_e, G, H, H_kv, K, L, N_s, S, V, f, n_W, t

attention = 2 * D**2 + 2 * D**2 * H_kv / H
ffn_dense = n_W * D * F
expert = n_W * D * F_e
router = D * E * G
embeddings = V * D * (2 - t)

blocks = L * (attention + (1 - f) * ffn_dense + f * (E * G + N_s) * expert)
total = blocks + f * L * router + embeddings
# routed experts: the part expert parallelism splits
experts = f * L * E * G * expert
# attention, dense FFNs and shared experts: the part tensor parallelism splits (memory.py)
tp_split = L * (attention + (1 - f) * ffn_dense + f * N_s * expert)
active = L * (attention + (1 - f) * ffn_dense + f * ((K * G + N_s) * expert + router)) + embeddings

# The input embedding is a lookup (no FLOPs); the output head is a GEMM. Causal
# attention reads S/2 keys on average for QK^T and again for AV.
flops_forward = 2 * (active - embeddings + V * D) + 2 * L * S * D
flops_backward = 2 * flops_forward

FORMULAS = {
    "parameters total": total,
    "parameters active": active,
    "parameters routed experts": experts,
    "FLOPs/token forward": flops_forward,
    "FLOPs/token backward": flops_backward,
}
