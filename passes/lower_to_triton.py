"""lower_to_triton: swap the reference routing ops for generated Triton kernels.

Matches: call_function nodes targeting moec::gate, moec::route, moec::permute
and moec::unpermute (their non-tensor arguments literal constants in
node.args, shapes in node.meta["val"]).
Rewrites: each such node's target becomes the moec_kernels:: op generated for
its configuration (codegen/gating.py, routing.py, permute.py); the arguments
and node.meta["val"] stay. The generated sources are recorded in
gm.meta["kernels"] as {module_name: source}, for the emitter to write to
build/kernels/. A route whose capacity is computed at run time (a graph value,
not a constant) keeps the reference op, and its permute/unpermute are generated
for rows that may be dropped.
Invariant: the graph computes what it computed before. The generated ops run
Triton on GPU tensors and the moec:: reference on CPU tensors, so on CPU the
outputs are identical.
"""
import operator

import torch
import torch.fx

import moec
from moec.codegen import gating, permute, routing
from moec.passes.base import Pass, PassResult

ops = torch.ops.moec
ALL = ("gate", "route", "permute", "unpermute")


def _args(node: torch.fx.Node) -> dict:
    """node.args and node.kwargs by the op schema's argument names."""
    names = [a.name for a in node.target._schema.arguments]
    return {**dict(zip(names, node.args)), **node.kwargs}


def _val(arg):
    return arg.meta["val"] if isinstance(arg, torch.fx.Node) else arg


def _may_drop(row_map) -> bool:
    """Whether a row map can hold -1: unless it comes from a dropless route, assume it can."""
    if (isinstance(row_map, torch.fx.Node) and row_map.target is operator.getitem
            and isinstance(row_map.args[0], torch.fx.Node) and row_map.args[0].target is ops.route.default):
        cap = _args(row_map.args[0])["capacity"]
        return not (isinstance(cap, int) and cap <= 0)
    return True


class LowerToTriton(Pass):
    name = "lower_to_triton"
    provides = ("kernels",)

    def __init__(self, ops_to_lower=ALL):
        unknown = set(ops_to_lower) - set(ALL)
        if unknown:
            raise moec.MoecError(f"{self.name}: cannot lower {sorted(unknown)}; choose from {ALL}")
        self.ops_to_lower = tuple(ops_to_lower)

    def _module(self, node: torch.fx.Node):
        if node.target not in (ops.gate.default, ops.route.default, ops.permute.default, ops.unpermute.default):
            return None
        a = _args(node)
        if node.target is ops.gate.default and "gate" in self.ops_to_lower:
            logits = _val(a["logits"])
            return gating.module(gating.config(logits.dtype, logits.shape[-1], a["k"], a["score"], a["renorm"],
                                               a["bias"] is not None, a["n_group"], a["topk_group"]))
        if node.target is ops.route.default and "route" in self.ops_to_lower:
            if not isinstance(a["capacity"], int):
                return None
            return routing.module(routing.config(a["num_experts"], a["capacity"]))
        if node.target is ops.permute.default and "permute" in self.ops_to_lower:
            return permute.module(permute.permute_config(_val(a["x"]).dtype, a["k"], _may_drop(a["row_map"])))
        if node.target is ops.unpermute.default and "unpermute" in self.ops_to_lower:
            w = _val(a["weights"])
            return permute.module(permute.unpermute_config(_val(a["y"]).dtype, w.dtype, w.shape[1],
                                                           _may_drop(a["row_map"])))
        return None

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        plan = []  # decided before any swap: a permute reads its route's original target
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            try:
                mod = self._module(node)
            except moec.MoecError as e:
                raise moec.MoecError(f"{self.name}: node {node.name}: {e}") from None
            if mod is not None:
                plan.append((node, mod))
        kernels = gm.meta.setdefault("kernels", {})
        for node, mod in plan:
            node.target = mod.OP
            kernels[mod.NAME] = mod.SOURCE
        return PassResult(gm, bool(plan))
