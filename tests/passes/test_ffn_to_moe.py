import itertools

import pytest
import torch

from moec.base.errors import MoecError
from moec.runtime.ops.moe import moe_layer
from moec.base.options import Options
from moec.passes.ffn_to_moe import FFNToMoE
from moec.passes.find_ffn import FindFFN
from tests.models import captured, run

# (experts, topk, router, shared, granularity, moe_every, first_dense, pyramid)
COMBOS = [
    (4, 1, "softmax", 0, 1, 1, 0, None), (4, 2, "softmax", 0, 1, 1, 0, None), (4, 4, "softmax", 0, 1, 1, 0, None),
    (4, 2, "sigmoid", 0, 1, 1, 0, None), (4, 2, "softmax", 1, 1, 1, 0, None), (4, 2, "softmax", 3, 1, 1, 0, None),
    (4, 2, "softmax", 0, 2, 1, 0, None), (4, 1, "softmax", 0, 4, 1, 0, None), (4, 2, "softmax", 2, 2, 1, 0, None),
    (4, 2, "sigmoid", 1, 2, 1, 0, None), (3, 2, "softmax", 3, 4, 1, 0, None), (4, 2, "softmax", 0, 1, 2, 0, None),
    (4, 2, "softmax", 0, 1, 1, 1, None), (4, 2, "softmax", 1, 2, 1, 0, (6, 1)), (5, 3, "sigmoid", 2, 1, 1, 0, (7, 2)),
]


@pytest.mark.parametrize("kind,combo", list(itertools.product(["sequential_gelu", "swiglu", "functional_relu"],
                                                              COMBOS)) + list(itertools.product(
    ["squared_relu", "quick_gelu_glu", "matmul_in_out_relu", "spelled_gelu_tanh"], [COMBOS[1], COMBOS[5], COMBOS[8]])))
def test_upcycled_model_computes_the_dense_model(kind, combo):
    E, K, router, S, M, every, first, pyramid = combo
    model, x, gm = captured(kind)
    run(gm, FindFFN())
    run(gm, FFNToMoE(Options(experts=E, topk=K, router=router, shared_experts=S, granularity=M, moe_every=every,
                        first_dense=first, pyramid=pyramid)))
    gm.graph.lint()
    out = gm(x)
    ref = model(x)
    assert (out["logits"] - ref).abs().max() <= 1e-5 * ref.abs().max()
    n_moe = len([i for i in range(2) if i >= first and (i - first) % every == 0])
    assert len(out["expert_counts"]) == n_moe
    assert sum(1 for n in gm.graph.nodes if n.target is moe_layer) == n_moe
    for c in out["expert_counts"]:
        assert c.sum().item() == x.shape[0] * x.shape[1] * K * M


def test_new_parameters_replace_the_dense_ones():
    _, _, gm = captured("swiglu")
    run(gm, FindFFN())
    run(gm, FFNToMoE(Options(experts=4, topk=2, granularity=2, shared_experts=1)))
    names = {n for n, _ in gm.named_parameters()}
    assert not any(".gate." in n or ".up." in n or ".down." in n for n in names)
    assert tuple(gm.get_parameter("blocks.0.moe.experts.w1").shape) == (8, 16, 16)
    assert tuple(gm.get_parameter("blocks.0.moe.experts.w2").shape) == (8, 16, 16)
    assert tuple(gm.get_parameter("blocks.0.moe.router.weight").shape) == (8, 16)
    assert tuple(gm.get_parameter("blocks.0.moe.shared.w1").shape) == (16, 16)


def test_aux_and_z_losses_match_their_definitions():
    model, x, gm = captured("sequential_gelu")
    run(gm, FindFFN())
    run(gm, FFNToMoE(Options(experts=4, topk=2, aux_loss=0.5, z_loss=0.25)))
    out = gm(x)
    expected_aux, expected_z = 0.0, 0.0
    h = x
    for i in range(2):  # recompute each layer's router statistics by hand
        xf = model.norm(h).reshape(-1, 16)
        logits = xf @ gm.get_parameter(f"blocks.{i}.moe.router.weight").t()
        probs = logits.softmax(-1)
        counts = torch.zeros(4).scatter_add_(0, probs.topk(2).indices.flatten(), torch.ones(2 * xf.shape[0]))
        expected_aux += 4 * (counts / counts.sum() * probs.mean(0)).sum()
        expected_z += torch.logsumexp(logits, -1).pow(2).mean()
        h = h + model.blocks[i](model.norm(h))
    assert torch.allclose(out["aux_loss"], 0.5 * expected_aux, rtol=1e-5)
    assert torch.allclose(out["z_loss"], 0.25 * expected_z, rtol=1e-5)


def test_noise_makes_experts_differ_and_capacity_drops_tokens():
    model, x, gm = captured("swiglu")
    run(gm, FindFFN())
    run(gm, FFNToMoE(Options(experts=4, topk=2, upcycle_noise=0.1, capacity_factor=0.5)))
    w1 = gm.get_parameter("blocks.0.moe.experts.w1")
    assert not torch.equal(w1[0], w1[1])
    out = gm(x)
    assert not torch.allclose(out["logits"], model(x), atol=1e-4)


@pytest.mark.parametrize("opts,message", [
    (dict(topk=5, experts=4), "more than the 4 experts"), (dict(topk=0), "at least 1"),
    (dict(shared_experts=8, experts=8), "less than the 8 routed experts"),
    (dict(topk=4, experts=8, pyramid=(3, 1)), "more than the 3 experts"),
])
def test_bad_options_are_clear_errors(opts, message):
    with pytest.raises(MoecError, match=message):
        Options(**opts).validate()


@pytest.mark.parametrize("opts,message", [
    (dict(granularity=5), "does not divide the FFN width"), (dict(first_dense=2), "leaves no FFN"),
])
def test_options_the_model_rules_out_are_clear_errors_from_the_pass(opts, message):
    _, _, gm = captured("swiglu")
    run(gm, FindFFN())
    options = Options(**opts).validate()
    with pytest.raises(MoecError, match=message):
        run(gm, FFNToMoE(options))
