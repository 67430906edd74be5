"""Step time from compute at a calibrated GEMM efficiency plus alpha-beta
communication, as sympy expressions.

Each collective costs calls * alpha + volume / beta, with alpha and beta of
its group read off the cluster graph (topology.py). Dispatch/combine and
tensor-parallel collectives sit on the critical path of every micro-batch, so
they stretch with the pipeline bubble as compute does; gradient reduction
(and ZeRO-3's parameter gathers) overlaps a share omega of backward compute
(of all compute with ZeRO-3).

Memory-bound work on the weights runs at the copy bandwidth beta_mem: per
step the optimizer and clipping pass over the fp32 weights, gradients and
moments, and in every micro-batch autocast makes the bf16 weight copies and
casts their gradients back (bytes per parameter below).

The elementwise work around the GEMMs (norms, casts, activations, the
routing copies, the loss) is memory-bound too: kappa passes over the
activations forward computes (at least 4: each byte written in forward, read
in backward, its gradient written and read; eager PyTorch, one kernel per
elementwise op, makes more, so the profile calibrates kappa), and the loss
passes over the logits LOGIT_TRAFFIC bytes per element. Recomputation keeps
fewer activations but computes them again, so it never makes a step faster:
full recompute (R) runs forward's share of the passes again, a third as for
the GEMMs (backward costs two forwards); the experts' (R_x) GEMMs write their
pre-activations once more. Kernel launch cost is not modelled: runs whose GPU
work per step is short are bound by the host and take longer than predicted.

Expert GEMMs are short: each local expert sees S*B*EP*K/E rows per
micro-batch, and a GEMM of m rows runs at eta * m / (m + m_half), m_half
being the rows at which the hardware reaches half its large-GEMM efficiency.
Expert parallelism buys longer expert GEMMs; the all-to-all is its price.

Tensor parallelism (memory.py's docstring) divides the GEMMs of attention,
dense FFNs and shared experts over the TP ranks; every TP rank runs the
router, the routed experts and the head on all its tokens, so those do not
get faster with TP, and MFU (which counts the model's FLOPs once) drops.
Sequence parallelism gives each TP rank its share of the tokens for the
router and the routed experts (shorter expert GEMMs, and 1/TP of the
dispatch); the head still runs every token.
"""
import sympy as sp

from moec.cost_model import comm, memory, params
from moec.cost_model.symbols import B, D, E, EP, F_e, G, K, L, M, PP, R, R_x, S, TP, V, Z, b, define, f, n_W

peak, eta, omega, m_half, bw, kappa = sp.symbols("Pi eta omega m_half beta_mem kappa", positive=True)
# bytes moved per parameter: fused AdamW reads weight, gradient, m, v and writes weight, m, v (28);
# clipping reads the gradient for its norm and scales it (12); autocast's bf16 copy of the weight
# (6) and the gradient cast back to fp32 (6), every micro-batch
OPTIMIZER_TRAFFIC, CLIP_TRAFFIC, CAST_TRAFFIC = 28, 12, 12
# bf16 logits written (2), cast to fp32 (6), log-softmax (8), its backward (12), cast back (6)
LOGIT_TRAFFIC = 34
COLLECTIVES = ("a2a", "grad_dense", "grad_experts", "tp", "pp")
alpha = {c: sp.Symbol(f"alpha_{c}", nonnegative=True) for c in COLLECTIVES}
beta = {c: sp.Symbol(f"beta_{c}", positive=True) for c in COLLECTIVES}


def _cost(c, calls, volume):
    return calls * alpha[c] + volume / beta[c]


C = define("C", params.flops_forward, "FLOPs per token, forward")
C_x = define("C_x", 2 * f * L * K * G * params.expert, "routed-expert FLOPs per token, forward")
# TP splits attention (projections and scores, by heads), dense FFNs and shared experts; the router and the
# head are whole on every TP rank, and so are the routed experts (each TP rank runs all its tokens' copies)
C_r = define("C_r", 2 * f * L * params.router + 2 * V * D, "FLOPs per token TP does not split, "
             "besides the routed experts': router and head, forward")
# with sequence parallelism a TP rank routes and runs the routed experts on its share of the tokens only
C_tok = define("C_tok", (2 * f * L * params.router + C_x) * memory.tp_share + 2 * V * D,
               "FLOPs per token a TP rank runs of those, forward")
# the model's tokens per GPU of one pipeline replica (what MFU counts), and the tokens each GPU computes on:
# a TP group's ranks all run the same tokens
tokens_per_gpu = M * S * B / (TP * PP)
tokens_run = M * S * B / PP
expert_rows = S * B * memory.tp_share * EP * K / E
eta_x = define("eta_x", eta * expert_rows / (expert_rows + m_half), "expert GEMM efficiency")
# recomputed expert pre-activations: the first GEMM(s) again, (n_W - 1) of the n_W expert GEMMs
C_rx = R_x * C_x * (n_W - 1) / n_W
compute = tokens_run * ((3 + R) * ((C - C_x - C_r) / TP + C_tok - C_x * memory.tp_share) / (eta * peak)
                        + ((3 + R) * C_x + C_rx) * memory.tp_share / (eta_x * peak))
backward = compute * 2 / (3 + R)
bubble = (M + PP - 1) / M

a2a = _cost("a2a", comm.a2a_calls, comm.a2a_volume)
tp = _cost("tp", comm.tp_calls, comm.tp_volume)
pp = _cost("pp", comm.pp_calls, comm.pp_volume)
grad = define("T_sync", _cost("grad_dense", comm.grad_calls, comm.grad_dense_volume)
              + _cost("grad_experts", comm.grad_calls, comm.grad_experts_volume),
              "gradient (and ZeRO-3 parameter) sync time per step")
window = define("W", sp.Piecewise((compute, Z >= 3), (backward, True)), "compute time the sync can hide under")
grad_exposed = sp.Max(0, grad - omega * window)

weights_local = memory.parameters / memory.WEIGHT_BYTES
sharded_state = memory.optimizer / memory.OPTIMIZER_BYTES
weight_traffic = define("T_w", (OPTIMIZER_TRAFFIC * sharded_state + CLIP_TRAFFIC * weights_local
                                + CAST_TRAFFIC * M * weights_local) / bw,
                        "optimizer, clipping and autocast casts of the weights per step")

# bytes per micro-batch and stage that forward computes (memory.act_layer lacks the expert
# pre-activations R_x drops), and the passes recomputation adds over them
expert_pre = memory.tokens_local * L / PP * f * b * K * G * (n_W - 1) * F_e
computed = memory.tokens_local * L / PP * memory.act_layer + R_x * expert_pre
recompute_traffic = R * kappa / 3 * computed + (1 - R) * R_x * expert_pre
activation_traffic = define(
    "T_act", M * (kappa * computed + recompute_traffic + LOGIT_TRAFFIC * memory.tokens_local * V) / bw,
    "memory-bound elementwise work per step")

TERMS = {
    "compute": define("T_comp", bubble * compute, "compute time per step, pipeline bubble included"),
    "weight traffic": weight_traffic,
    "activation traffic": activation_traffic,
    "all-to-all": define("T_a2a", bubble * a2a, "dispatch/combine time per step"),
    "tensor parallel": define("T_tp", bubble * tp, "tensor-parallel collective time per step"),
    "pipeline sends": define("T_pp", pp, "pipeline send time per step"),
    "gradient sync (exposed)": define("T_grad", grad_exposed, "gradient sync time not hidden under compute"),
}
step = sum(TERMS.values())
# model FLOPs (no recompute) over what the GPUs of one pipeline replica could do
mfu = 3 * C * tokens_per_gpu / (step * peak)
