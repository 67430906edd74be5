import torch

from moec.runtime.ops.moe import moe_layer
from moec.base.options import Options
from moec.passes.ffn_to_moe import FFNToMoE
from moec.passes.find_ffn import FindFFN
from moec.passes.lower_moe import LowerMoE
from tests.models import captured, run


def _grads(gm, x):
    gm.zero_grad()
    out = gm(x)
    (out["logits"].square().sum() + out["aux_loss"] + out["z_loss"]).backward()
    return out, {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}


def test_lowering_keeps_outputs_and_gradients_exactly():
    for cf in (0.0, 0.75):
        _, x, gm = captured("swiglu", seed=3)
        run(gm, FindFFN())
        run(gm, FFNToMoE(Options(experts=4, topk=2, capacity_factor=cf, upcycle_noise=0.05)))
        before, g_before = _grads(gm, x)
        result = run(gm, LowerMoE())
        gm.graph.lint()
        assert result.modified
        assert not any(n.target is moe_layer for n in gm.graph.nodes)
        targets = {n.target for n in gm.graph.nodes}
        ops = torch.ops.moec
        assert {ops.gate.default, ops.route.default, ops.permute.default, ops.experts.default,
                ops.unpermute.default} <= targets
        after, g_after = _grads(gm, x)
        assert torch.equal(before["logits"], after["logits"])
        assert g_before.keys() == g_after.keys()
        assert all(torch.allclose(g_before[n], g_after[n], rtol=1e-6, atol=1e-7) for n in g_before)


def test_lowered_graph_runs_at_other_sizes():
    _, _, gm = captured("sequential_gelu")
    run(gm, FindFFN())
    run(gm, FFNToMoE(Options(experts=4, topk=2, capacity_factor=1.0)))
    run(gm, LowerMoE())
    out = gm(torch.randn(3, 11, 16))
    assert out["logits"].shape == (3, 11, 16)
    assert out["expert_counts"][0].sum().item() == 3 * 11 * 2


def test_recompute_experts_reaches_the_op_and_keeps_gradients():
    grads = {}
    for recompute in (False, True):
        _, x, gm = captured("swiglu", seed=5)
        run(gm, FindFFN())
        run(gm, FFNToMoE(Options(experts=4, topk=2, recompute_experts=recompute)))
        run(gm, LowerMoE())
        node = next(n for n in gm.graph.nodes if n.target is torch.ops.moec.experts.default)
        assert node.args[9] is recompute
        grads[recompute] = _grads(gm, x)[1]
    assert all(torch.allclose(grads[False][n], grads[True][n], rtol=1e-6, atol=1e-7) for n in grads[False])
