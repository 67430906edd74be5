"""Step time from compute at a calibrated GEMM efficiency plus alpha-beta
communication, as sympy expressions.

Each collective costs calls * alpha + volume / beta, with alpha and beta of
its group read off the cluster graph (topology.py). Dispatch/combine and
tensor-parallel collectives sit on the critical path of every micro-batch, so
they stretch with the pipeline bubble as compute does; gradient reduction
(and ZeRO-3's parameter gathers) overlaps a share omega of backward compute
(of all compute with ZeRO-3).

Expert GEMMs are short: each local expert sees S*B*EP*K/E rows per
micro-batch, and a GEMM of m rows runs at eta * m / (m + m_half), m_half
being the rows at which the hardware reaches half its large-GEMM efficiency.
Expert parallelism buys longer expert GEMMs; the all-to-all is its price.
"""
import sympy as sp

from moec.cost_model import comm, params
from moec.cost_model.symbols import B, E, EP, G, K, L, M, PP, R, S, TP, Z, define, f

peak, eta, omega, m_half = sp.symbols("Pi eta omega m_half", positive=True)
COLLECTIVES = ("a2a", "grad_dense", "grad_experts", "tp", "pp")
alpha = {c: sp.Symbol(f"alpha_{c}", nonnegative=True) for c in COLLECTIVES}
beta = {c: sp.Symbol(f"beta_{c}", positive=True) for c in COLLECTIVES}


def _cost(c, calls, volume):
    return calls * alpha[c] + volume / beta[c]


C = define("C", params.flops_forward, "FLOPs per token, forward")
C_x = define("C_x", 2 * f * L * K * G * params.expert, "routed-expert FLOPs per token, forward")
tokens_per_gpu = M * S * B / (TP * PP)
expert_rows = S * B * EP * K / E
eta_x = define("eta_x", eta * expert_rows / (expert_rows + m_half), "expert GEMM efficiency")
compute = (3 + R) * tokens_per_gpu * ((C - C_x) / (eta * peak) + C_x / (eta_x * peak))
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

TERMS = {
    "compute": define("T_comp", bubble * compute, "compute time per step, pipeline bubble included"),
    "all-to-all": define("T_a2a", bubble * a2a, "dispatch/combine time per step"),
    "tensor parallel": define("T_tp", bubble * tp, "tensor-parallel collective time per step"),
    "pipeline sends": define("T_pp", pp, "pipeline send time per step"),
    "gradient sync (exposed)": define("T_grad", grad_exposed, "gradient sync time not hidden under compute"),
}
step = sum(TERMS.values())
# model FLOPs (no recompute) over what the GPUs of one pipeline replica could do
mfu = 3 * C * tokens_per_gpu / (step * peak)
