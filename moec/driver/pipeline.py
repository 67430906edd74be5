"""The pass pipeline as data, and the pass manager that holds every pass to its contract.

PIPELINE is the one ordered list of pass names; `passes_for` keeps the ones
a build's options call for and stops after `stop_after`. For each pass the
manager checks that the facts it requires are there, runs it, checks the
facts it provides, then lints the graph, recompiles it and propagates shapes
to the nodes that lack them, and checks that every node the pass created
carries provenance (an nn_module_stack). Any failure names the pass and the
passes before it.

IR dumps, with an output dir: ir/00_capture.py, then ir/NN_<pass>.py (the graph
as readable code with shapes, under the lines the pass reports, e.g. the FFNs
an analysis found) and ir/NN_<pass>.diff (what the pass changed), plus
ir/summary.json with one row per pass.
"""
import difflib
import json
import re
import time
from pathlib import Path

import torch.fx

from moec.base.errors import MoecError
from moec.base.graph import propagate_shapes
from moec.base.options import Options
from moec.driver.stats import summary
from moec.passes.base import FACTS, PassResult
from moec.passes.ffn_to_moe import FFNToMoE
from moec.passes.find_ffn import FindFFN
from moec.passes.insert_collectives import InsertCollectives
from moec.passes.lower_moe import LowerMoE
from moec.passes.lower_to_triton import LowerToTriton
from moec.passes.plan_sharding import PlanSharding
from moec.passes.sample_ffn_inputs import SampleFFNInputs
from moec.passes.tensor_parallel import TensorParallel

PIPELINE = ("find_ffn", "sample_ffn_inputs", "ffn_to_moe", "lower_moe", "plan_sharding", "insert_collectives",
            "tensor_parallel", "lower_to_triton")


class PassFailed(RuntimeError):
    """A pass broke on a graph it should have handled: a bug to report, not a user error."""


def check_stop_after(stop_after: str | None) -> None:
    if stop_after is not None and stop_after not in PIPELINE:
        raise MoecError(f"--stop-after {stop_after}: no such pass; passes: {', '.join(PIPELINE)}")


def passes_for(options: Options, plan=None, stop_after: str | None = None) -> list:
    """The passes a build runs, in PIPELINE's order: a dense build only finds the FFNs; plan_sharding runs
    for a planner's plan, insert_collectives for expert parallelism, tensor_parallel for TP > 1,
    lower_to_triton unless --no-triton."""
    check_stop_after(stop_after)
    wanted = {"find_ffn": True, "sample_ffn_inputs": not options.dense and options.router_init != "random",
              "ffn_to_moe": not options.dense, "lower_moe": not options.dense,
              "plan_sharding": plan is not None and not options.dense,
              "insert_collectives": options.ep > 1 and not options.dense, "tensor_parallel": options.tp > 1,
              "lower_to_triton": options.triton and not options.dense}
    make = {"find_ffn": FindFFN, "sample_ffn_inputs": lambda: SampleFFNInputs(options),
            "ffn_to_moe": lambda: FFNToMoE(options), "lower_moe": LowerMoE,
            "plan_sharding": lambda: PlanSharding(plan), "insert_collectives": lambda: InsertCollectives(options),
            "tensor_parallel": lambda: TensorParallel(options.tp, options.sequence_parallel),
            "lower_to_triton": LowerToTriton}
    out = []
    for name in PIPELINE:
        if wanted[name]:
            out.append(make[name]())
        if name == stop_after:
            break
    return out


_LIBRARY_FRAME = re.compile(r"^\s*# File: .*(site-packages|dist-packages)[/\\].*\n(\s*\n)?", re.M)


def readable(gm: torch.fx.GraphModule) -> str:
    """The graph as code with shapes; source comments kept only where they point at the user's model."""
    code = gm.print_readable(print_output=False, include_stride=False, include_device=False, colored=False)
    return _LIBRARY_FRAME.sub("", code)


def _fail(p, done: list[str], what: str, e: Exception):
    after = f" (after {', '.join(done)})" if done else " (the first pass)"
    if isinstance(e, MoecError):
        msg = str(e)
        return MoecError(msg if msg.startswith(p.name) else f"{p.name}: {msg}")
    return PassFailed(f"pass {p.name}{after} {what}: {type(e).__name__}: {e}")


def run_pass(gm: torch.fx.GraphModule, p, done: list[str]) -> PassResult:
    """One pass under the contract (see the module docstring)."""
    missing = [f for f in p.requires if f not in gm.meta]
    if missing:
        raise PassFailed(f"pass {p.name} requires {', '.join(f'{m} ({FACTS[m]})' for m in missing)}, which no pass "
                         f"before it provides (passes so far: {', '.join(done) or 'none'})")
    before = set(gm.graph.nodes)
    try:
        result = p(gm)
    except Exception as e:
        raise _fail(p, done, "failed", e) from e
    gm = result.graph_module
    lost = [f for f in p.provides if f not in gm.meta]
    if lost:
        raise PassFailed(f"pass {p.name} did not provide {', '.join(lost)}")
    orphans = [n.name for n in gm.graph.nodes if n not in before and n.op in ("call_function", "get_attr")
               and "nn_module_stack" not in n.meta]
    if orphans:
        raise PassFailed(f"pass {p.name} created nodes without provenance ({', '.join(orphans[:5])}); "
                         f"create them inside passes.base.inherit_provenance")
    if result.modified:
        try:
            gm.graph.lint()
            gm.recompile()
            propagate_shapes(gm)
        except Exception as e:
            raise _fail(p, done, "left a graph that does not check", e) from e
    return result


def _dump(gm, p, result, i, before: str, ir_dir: Path) -> str:
    after = readable(gm) if result.modified else before
    found = p.report(gm)
    text = "".join(f"# {line}\n" for line in found) + ("\n" if found else "") + after
    (ir_dir / f"{i:02d}_{p.name}.py").write_text(text)
    diff = difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                f"before/{p.name}.py", f"after/{p.name}.py", n=2)
    (ir_dir / f"{i:02d}_{p.name}.diff").write_text("".join(f"# {line}\n" for line in found) + "".join(diff))
    return after


def _count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:,}"


def _grouped(lines: list[str]) -> list[str]:
    """Each line once, and lines that differ only in their numbers (one warning in every layer) as one."""
    groups: dict[str, dict[str, None]] = {}
    for line in lines:
        groups.setdefault(re.sub(r"\d+", "#", line), {})[line] = None
    return [next(iter(same)) + (f" (and {len(same) - 1} more like it)" if len(same) > 1 else "")
            for same in groups.values()]


def run_pipeline(gm: torch.fx.GraphModule, passes: list, ir_dir: Path | None = None, log=lambda s: None):
    """Run the passes in order under the manager; (graph, one summary row per pass)."""
    rows, done = [], []
    before = readable(gm) if ir_dir is not None else ""
    if ir_dir is not None:
        ir_dir.mkdir(parents=True, exist_ok=True)
        (ir_dir / "00_capture.py").write_text(before)
        rows.append({"pass": "capture", **summary(gm), "modified": True})
    for i, p in enumerate(passes, 1):
        t = time.perf_counter()
        result = run_pass(gm, p, done)
        gm = result.graph_module
        stats = summary(gm)
        log(f"  {i:02d} {p.name:<18} {stats['nodes']:>6} nodes  {_count(stats['params']):>10} params  "
            f"{'changed' if result.modified else 'unchanged'}  "
            f"{time.perf_counter() - t:.1f} s")
        for line in _grouped(p.warnings(gm)):
            log(f"     {p.name}: {line}")
        if ir_dir is not None:
            before = _dump(gm, p, result, i, before, ir_dir)
        rows.append({"pass": p.name, **stats, "modified": result.modified})
        done.append(p.name)
    if ir_dir is not None:
        (ir_dir / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    return gm, rows
