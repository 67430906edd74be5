"""plan_sharding on a tiny hand-built graph around moec::experts."""
import pytest
import torch
import torch.fx

from moec.base.errors import MoecError
from moec.cost_model import Plan
from moec.passes.plan_sharding import PlanSharding
from tests.models import run

E, F, D, N = 8, 16, 4, 12


def experts_graph() -> torch.fx.GraphModule:
    root = torch.nn.Module()
    root.w1 = torch.nn.Parameter(torch.randn(E, F, D))
    root.w2 = torch.nn.Parameter(torch.randn(E, D, F))
    g = torch.fx.Graph()
    x, offsets = g.placeholder("x"), g.placeholder("offsets")
    w1, w2 = g.get_attr("w1"), g.get_attr("w2")
    w1.meta["val"], w2.meta["val"] = root.w1.detach().to("meta"), root.w2.detach().to("meta")
    y = g.call_function(torch.ops.moec.experts.default, (x, offsets, w1, None, None, None, w2, None, "relu"))
    z = g.call_function(torch.ops.aten.relu.default, (y,))
    g.output(z)
    return torch.fx.GraphModule(root, g)


def plan(ep: int) -> Plan:
    return Plan(ep=ep, dp=8 // ep, tp=1, pp=1, zero=1, recompute=False, micro_batch=1, micro_batches=4, gpus=8,
                hardware="dgx_h100", model="tiny")


def test_tags_experts_nodes_and_reports_plan():
    gm = experts_graph()
    x, offsets = torch.randn(N, D), torch.tensor([0, 2, 2, 5, 6, 6, 9, 10, 12], dtype=torch.int32)
    before = gm(x, offsets)
    result = run(gm, PlanSharding(plan(4)))
    gm = result.graph_module
    gm.graph.lint()
    assert not result.modified and "EP4 DP2" in "\n".join(PlanSharding(plan(4)).report(gm))
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.moec.experts.default)
    assert (node.meta["ep_size"], node.meta["local_experts"]) == (4, 2)
    other = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    assert "ep_size" not in other.meta
    torch.testing.assert_close(gm(x, offsets), before)


def test_ep_must_divide_experts():
    with pytest.raises(MoecError, match="not divisible by the plan's EP=3"):
        run(experts_graph(), PlanSharding(plan(3)))
