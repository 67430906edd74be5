"""The named symbols every cost formula is written in.

Model: L layers, D hidden, F dense FFN width, F_e expert width (F/G unless a
model sets it), H heads, H_kv key/value heads, V vocab, t tied embeddings
(0/1), n_W FFN weight matrices (3 gated, 2 plain).
MoE: E experts and K top-k before the fine-grained split, G granularity (E*G
routed experts of width F/G, top K*G), N_s shared experts, f the fraction of
layers that are MoE.
Run: S sequence, B micro-batch, M micro-batches per step, b bytes per element
of parameters and activations.
Parallelism: N = EP*DP*TP*PP GPUs. Experts are split over EP and replicated
over DP (DP is the expert-data-parallel degree) and over TP (the ranks of a
TP group hold the same experts and run the same tokens); the dense part is
data-parallel over EP*DP, and TP splits its attention, dense FFNs and shared
experts (Megatron's column/row split); Q is 1 with sequence parallelism, which
shards the tokens outside those over the TP ranks. Z is the ZeRO stage, R is 1 with full activation
recompute, R_x is 1 when the routed experts recompute their pre-activations
in backward (`moec compile --recompute-experts`).
"""
import functools

import sympy as sp

L, D, F, F_e, H, H_kv, V, t, n_W = sp.symbols("L D F F_e H H_kv V t n_W", positive=True)
E, K, G, N_s, f = sp.symbols("E K G N_s f", nonnegative=True)
S, B, M, b = sp.symbols("S B M b", positive=True)
EP, DP, TP, PP = sp.symbols("EP DP TP PP", positive=True, integer=True)
Z, R, R_x = sp.symbols("Z R R_x", nonnegative=True, integer=True)
Q = sp.symbols("Q", nonnegative=True, integer=True)

# the data-parallel degree of the dense (non-expert) part
DP_dense = EP * DP

MEANING = {
    L: "layers", D: "hidden size", F: "dense FFN width", F_e: "expert width", H: "attention heads",
    H_kv: "key/value heads", V: "vocabulary", t: "tied embeddings (0/1)", n_W: "FFN weight matrices",
    E: "experts before the fine-grained split", K: "top-k before the split", G: "granularity",
    N_s: "shared experts", f: "share of layers that are MoE", S: "sequence length", B: "micro-batch (sequences)",
    M: "micro-batches per step", b: "bytes per parameter/activation element", EP: "expert parallel",
    DP: "expert data parallel (the dense part is data-parallel over EP*DP)", TP: "tensor parallel",
    PP: "pipeline stages", Z: "ZeRO stage", R: "full activation recompute (0/1)",
    R_x: "routed experts recompute their pre-activations (0/1)",
    Q: "sequence parallelism (0/1)",
}

# Named intermediate quantities: formulas refer to them by symbol so that they
# print short; expand() substitutes their definitions before evaluation.
DEFINED: dict[sp.Symbol, tuple[sp.Expr, str]] = {}


def define(name: str, expr: sp.Expr, meaning: str) -> sp.Symbol:
    sym = sp.Symbol(name, nonnegative=True)
    DEFINED[sym] = (expr, meaning)
    return sym


def expand(expr: sp.Expr) -> sp.Expr:
    while named := expr.free_symbols & DEFINED.keys():
        expr = expr.xreplace({n: DEFINED[n][0] for n in named})
    return expr


@functools.cache
def lambdified(expr: sp.Expr, leading: tuple = ()) -> tuple:
    """(expr's other symbols, in order; a function of leading then them): expanded and lambdified once, as the
    planner evaluates the same formulas for every candidate plan and stage."""
    expr = expand(sp.sympify(expr))
    syms = sorted(expr.free_symbols - set(leading), key=str)
    return syms, sp.lambdify((*leading, *syms), expr, modules="math")


def evaluate(expr: sp.Expr, values: dict) -> float:
    """expr at values (every symbol it has after expand)."""
    syms, fn = lambdified(expr)
    return float(fn(*(float(values[x]) for x in syms)))
