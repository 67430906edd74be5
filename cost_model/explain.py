"""`moec plan --explain`: every formula the plan was ranked by, printed with
sympy (pretty or LaTeX), then the numbers substituted into it."""
import sympy as sp

from moec.cost_model import comm, memory, params, time_model
from moec.cost_model import symbols as s
from moec.cost_model.hardware import Hardware
from moec.cost_model.pipeline import bubble, cut
from moec.cost_model.planner import PER_LAYER_TERMS, Plan, gib, values_for
from moec.base.options import Options
from moec.cost_model.shape import ModelShape

SECTIONS = (
    ("Parameters and FLOPs", params.FORMULAS, "count"),
    ("Memory per GPU", memory.TERMS, "bytes"),
    ("Communication per GPU per step", comm.VOLUMES, "bytes"),
    ("Time per step (terms under named quantities)", {"step": time_model.step, "MFU": time_model.mfu}, "seconds"),
)
COLLECTIVE_NAMES = {"a2a": "dispatch/combine all-to-all over EP", "grad_dense": "dense gradients over EP*DP",
                    "grad_experts": "expert gradients over DP", "tp": "tensor-parallel all-reduce",
                    "pp": "pipeline send/recv"}


def _fmt(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / 2**30:.3f} GiB"
    if unit == "seconds":
        return f"{value * 1e3:.2f} ms"
    return f"{value:.4g}"


def _show(expr, latex: bool) -> str:
    return sp.latex(expr) if latex else sp.pretty(expr, use_unicode=True, wrap_line=False)


def _value(expr, values: dict) -> float:
    return float(s.expand(expr).xreplace(values).evalf())


def explain(plan: Plan, shape: ModelShape, moe: Options, hw: Hardware, latex: bool = False) -> str:
    values = values_for(plan, shape, moe, hw)
    out = [f"Plan {plan.label()} for {shape.name} on {plan.gpus} x {hw.gpu_name} ({hw.name})", "",
           "Where (symbols and the numbers substituted):"]
    collective = {*time_model.alpha.values(), *time_model.beta.values()}  # listed under Collectives below
    model_syms = sorted((k for k in values if k not in collective), key=str)
    meaning = {**s.MEANING, time_model.peak: "peak FLOP/s per GPU", time_model.eta: "large-GEMM efficiency",
               time_model.m_half: "GEMM rows at half efficiency", time_model.omega: "share of compute sync hides under",
               time_model.bw: "memory copy bandwidth per GPU, bytes/s",
               time_model.kappa: "memory-bound passes over the activations per micro-batch (profile's "
                                 "elementwise_passes)"}
    num = lambda x: f"{x:.6g}" if isinstance(x, float) else str(x)
    out += [f"  {f'{k} = {num(values[k])}':<24}{meaning.get(k, '')}" for k in model_syms]
    out += ["", "Collectives (alpha, beta read off the cluster graph):"]
    for name, c in plan.collectives.items():
        out.append(f"  {name}: {COLLECTIVE_NAMES[name]}: {c['algorithm']}, alpha = {c['alpha_s'] * 1e6:.1f} us, "
                   f"beta = {c['bandwidth_Bps'] / 1e9:.1f} GB/s, busiest link {c['bottleneck']}")
    out += ["", "Named quantities:"]
    for sym, (expr, meaning) in s.DEFINED.items():
        unit = "seconds" if str(sym).startswith("T_") else "count"
        out += [f"  {sym}: {meaning}", _indent(_show(sp.Eq(sym, expr), latex)),
                f"    = {_fmt(_value(expr, values), unit)}"]
    for title, formulas, unit in SECTIONS:
        out += ["", f"{title}:"]
        for name, expr in formulas.items():
            value = _value(expr, values)
            shown = f"{value:.1%}" if name == "MFU" else _fmt(value, unit)
            out += [f"  {name}", _indent(_show(expr, latex)), f"    = {shown}"]
    if plan.pp > 1:
        out += ["", *_pipeline(plan, shape, moe, values, hw)]
    return "\n".join(out)


def _pipeline(plan: Plan, shape: ModelShape, moe: Options, values: dict, hw: Hardware) -> list[str]:
    """The stage split `moec compile` would write (one stage per rank, 1F1B), each stage's predicted memory,
    and the bubble the time model counts."""
    bounds, shares, held = cut(shape, moe, plan.pp, values, hw.memory_bytes)
    return [f"Pipeline ({plan.pp} stages, 1F1B, {plan.micro_batches} micro-batches):",
            "  stages (layers, share of the forward FLOPs, peak GiB; the last carries the head, the first keeps "
            "the most micro-batches in flight): " +
            ", ".join(f"{a}-{b - 1} {x:.0%} {gib(m)}" for a, b, x, m in zip(bounds, bounds[1:], shares, held)),
            f"  the plan's peak, by which it is ranked and fitted, is its largest stage's: {gib(max(held))} GiB "
            f"(Memory per GPU above is an average stage's)",
            f"  the slowest rank has {plan.pipeline_imbalance:.3f}x an average stage's FLOPs: the plan's "
            f"{', '.join(PER_LAYER_TERMS)} terms are stretched by it ({plan.step_time_s * 1e3:,.1f} ms/step, "
            f"where the step formula above says an average stage's)",
            f"  bubble: (PP - 1) / (M + PP - 1) = {bubble(plan.pp, plan.micro_batches, '1f1b'):.1%} of each "
            f"rank's step idle"]


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
