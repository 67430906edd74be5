"""What `moec plan` prints and writes: the ranked table and plan.json."""
import json
from dataclasses import asdict
from pathlib import Path

from moec.cost_model.planner import Plan
from moec.base.options import Options
from moec.cost_model.shape import ModelShape

GiB = 2**30
COLUMNS = ("rank", "plan", "M", "weights+opt GiB", "act GiB", "total GiB", "compute ms", "a2a ms", "tp ms",
           "pp ms", "grad ms", "step ms", "MFU")


def _row(i: int, p: Plan) -> tuple:
    m, t = p.memory_bytes, p.time_s
    states = m["parameters"] + m["gradients"] + m["optimizer state"]
    return (str(i), p.label(), str(p.micro_batches), f"{states / GiB:.1f}", f"{m['activations'] / GiB:.1f}",
            f"{p.peak_memory_bytes / GiB:.1f}", f"{t['compute'] * 1e3:.0f}", f"{t['all-to-all'] * 1e3:.0f}",
            f"{t['tensor parallel'] * 1e3:.0f}", f"{t['pipeline sends'] * 1e3:.0f}",
            f"{t['gradient sync (exposed)'] * 1e3:.0f}", f"{p.step_time_s * 1e3:.0f}", f"{p.mfu:.1%}")


def table(plans: list[Plan], top: int) -> str:
    rows = [COLUMNS] + [_row(i + 1, p) for i, p in enumerate(plans[:top])]
    widths = [max(len(r[c]) for r in rows) for c in range(len(COLUMNS))]
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
