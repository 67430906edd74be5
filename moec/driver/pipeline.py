"""The pass pipeline, in one ordered list, and the IR dumps it writes.

After every pass: ir/NN_<pass>.py (the graph as readable code with shapes)
and ir/NN_<pass>.diff (what the pass changed), plus ir/summary.json with one
row per pass. NN counts from 01; 00_capture.py is the graph as captured.
"""
import difflib
import json
import re
import time
from pathlib import Path

import torch.fx

from moec.base.errors import MoecError
from moec.passes.ffn_to_moe import FFNToMoE, MoeOptions
from moec.passes.find_ffn import FindFFN
from moec.passes.insert_collectives import EPOptions, InsertCollectives
from moec.passes.lower_moe import LowerMoE
from moec.passes.lower_to_triton import LowerToTriton
from moec.passes.plan_sharding import PlanSharding
from moec.driver.stats import summary


def build_pipeline(options: MoeOptions, dense: bool = False, plan=None, triton: bool = True,
                   ep: EPOptions | None = None) -> list:
    """The passes in order; a dense build stops after finding the FFNs; insert_collectives runs for a plan or
    EP options."""
    if dense:
        return [FindFFN()]
    return ([FindFFN(), FFNToMoE(options), LowerMoE()] + ([PlanSharding(plan)] if plan is not None else [])
            + ([InsertCollectives(ep or EPOptions())] if plan is not None or ep is not None else [])
            + ([LowerToTriton()] if triton else []))


_LIBRARY_FRAME = re.compile(r"^\s*# File: .*(site-packages|dist-packages)[/\\].*\n(\s*\n)?", re.M)


def readable(gm: torch.fx.GraphModule) -> str:
    """The graph as code with shapes; source comments kept only where they point at the user's model."""
    code = gm.print_readable(print_output=False, include_stride=False, include_device=False, colored=False)
    return _LIBRARY_FRAME.sub("", code)


def run_pipeline(gm: torch.fx.GraphModule, passes: list, ir_dir: Path | None = None, log=lambda s: None):
    rows = []
    before = readable(gm)
    if ir_dir is not None:
        ir_dir.mkdir(parents=True, exist_ok=True)
        (ir_dir / "00_capture.py").write_text(before)
        rows.append({"pass": "capture", **summary(gm), "modified": True})
    for i, p in enumerate(passes, 1):
        t = time.perf_counter()
        try:
            result = p(gm)
        except MoecError as e:
            msg = str(e)
            raise MoecError(msg if msg.startswith(p.name) else f"{p.name}: {msg}") from e
        gm = result.graph_module
        seconds = time.perf_counter() - t
        stats = summary(gm)
        log(f"  {i:02d} {p.name:<18} {stats['nodes']:>6} nodes  {stats['params'] / 1e6:>10.2f} M params  "
            f"{'changed' if result.modified else 'unchanged'}  {seconds:.1f} s")
        if ir_dir is not None:
            after = readable(gm) if result.modified else before
            (ir_dir / f"{i:02d}_{p.name}.py").write_text(after)
            diff = difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                        f"before/{p.name}.py", f"after/{p.name}.py", n=2)
            (ir_dir / f"{i:02d}_{p.name}.diff").write_text("".join(diff))
            before = after
        rows.append({"pass": p.name, **stats, "modified": result.modified})
    if ir_dir is not None:
        (ir_dir / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    return gm, rows
