"""plan_sharding: attach the cost model's parallel plan to the graph.

Matches: call_function nodes whose target is torch.ops.moec.experts.default
(the expert FFNs that lower_moe produced).
Rewrites: nothing in the computation. Tags every experts node with
meta["ep_size"] (the expert-parallel degree) and meta["local_experts"]
(experts per EP rank), which insert_collectives reads to place the
dispatch/combine all-to-all; the IR dump shows the plan (a
moec.cost_model.Plan: EP, DP, TP, PP, ZeRO stage, recompute, micro-batches).
Invariant: the graph computes what it computed before; every experts node's
expert count is divisible by the plan's EP.
"""
import torch
import torch.fx

from moec.base.errors import MoecError
from moec.cost_model.planner import Plan
from moec.passes.base import Pass, PassResult

EXPERTS = torch.ops.moec.experts.default


class PlanSharding(Pass):
    name = "plan_sharding"

    def __init__(self, plan: Plan):
        self.plan = plan

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        ep = self.plan.ep
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target is not EXPERTS:
                continue
            w1 = node.args[2]
            val = w1.meta.get("val") if isinstance(w1, torch.fx.Node) else None
            if val is None:
                raise MoecError(f"{self.name}: {node.name} has no shape on its expert weights; "
                                "run shape propagation before this pass")
            experts = val.shape[0]
            if experts % ep:
                raise MoecError(f"{self.name}: {node.name} has {experts} experts, not divisible by the plan's "
                                f"EP={ep}; plan with an EP that divides {experts}")
            node.meta["ep_size"] = ep
            node.meta["local_experts"] = experts // ep
        return PassResult(gm, False)  # tags only: the computation is unchanged

    def report(self, gm: torch.fx.GraphModule) -> list[str]:
        p = self.plan
        tagged = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is EXPERTS)
        return [f"plan: {p.label()}, {p.micro_batches} micro-batches of {p.micro_batch} on {p.gpus} GPUs "
                f"({p.hardware})", f"{tagged} expert layers sharded EP={p.ep}", p.why]
