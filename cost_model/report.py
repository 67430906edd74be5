"""What `moec plan` prints and writes: the ranked table and plan.json."""
import json
from dataclasses import asdict
from pathlib import Path

from moec.cost_model.planner import Plan, gib
from moec.base.options import Options
from moec.cost_model.shape import ModelShape

COLUMNS = ("rank", "plan", "M", "params+opt GiB", "grads GiB", "transient GiB", "peak GiB", "compute ms",
           "w-traffic ms", "act-traffic ms", "a2a ms", "tp ms", "pp ms", "grad ms", "step ms", "MFU")
LEGEND = """\
M: micro-batches per step. Memory per GPU: params+opt, the fp32 weights and Adam moments; grads, the fp32
gradients; transient, the activations, bf16 weight copies, logits and all-to-all buffers; peak, params+opt
and the larger of grads and transient (train.py frees the gradients before each forward); with PP the
columns are an average stage's, and peak is the largest stage's in the cut `moec compile` makes.
Time per step: compute, the GEMMs (pipeline bubble included); w-traffic, the optimizer, clipping and
autocast casts of the weights; act-traffic, the memory-bound elementwise work (kappa passes over the
activations, the profile's elementwise_passes, and the loss over the logits); a2a, dispatch/combine;
tp, tensor-parallel collectives; pp, pipeline sends; grad, gradient sync not hidden under backward;
step, their sum. MFU: model FLOPs over the GPUs' peak (recomputation not counted)."""


def _row(i: int, p: Plan) -> tuple:
    m, t = p.memory_bytes, p.time_s
    transient = m["bf16 weight copies"] + m["activations"] + m["logits"] + m["all-to-all buffers"]
    ms = lambda term: f"{t[term] * 1e3:,.0f}"  # noqa: E731
    return (str(i), p.label(), str(p.micro_batches), gib(m["parameters"] + m["optimizer state"]),
            gib(m["gradients"]), gib(transient), gib(p.peak_memory_bytes), ms("compute"), ms("weight traffic"),
            ms("activation traffic"), ms("all-to-all"), ms("tensor parallel"), ms("pipeline sends"),
            ms("gradient sync (exposed)"), f"{p.step_time_s * 1e3:,.0f}", f"{p.mfu:.1%}")


def table(plans: list[Plan], top: int, runs=None) -> str:
    """The top plans, one row each; runs(plan): whether train.py carries the plan out (a last column)."""
    rows = [COLUMNS] + [_row(i + 1, p) for i, p in enumerate(plans[:top])]
    if runs is not None:
        rows = [rows[0] + ("train.py",)] + [r + ("runs" if runs(p) else "not yet",) for r, p in zip(rows[1:], plans)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c == 1 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def plan_record(ranked: list[Plan], enumerated: int, shape: ModelShape, moe: Options) -> dict:
    """plan.json: the chosen plan, why, and the runners-up it beat."""
    return {"chosen": ranked[0].to_dict(), "why": ranked[0].why, "model": asdict(shape), "moe": asdict(moe),
            "candidates_enumerated": enumerated, "candidates_fit": len(ranked),
            "runners_up": [{"plan": p.label(), "step_time_s": p.step_time_s, "memory_bytes": p.peak_memory_bytes,
                            "mfu": p.mfu} for p in ranked[1:6]]}


def write_plan_json(build_dir, ranked: list[Plan], enumerated: int, shape: ModelShape, moe: Options) -> Path:
    path = Path(build_dir) / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan_record(ranked, enumerated, shape, moe), indent=1) + "\n")
    return path
