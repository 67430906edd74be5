"""Balancing and diversification options of ffn_to_moe/lower_moe: the calibrated selection bias,
--force-balance, the sequence-level aux loss, scaled gate weights and Drop-Upcycling, each on the model
of test_router_init (FFN inputs sharing a large mean direction)."""
import pytest
import torch

from moec.base.options import Options
from moec.driver.capture import capture
from moec.passes.ffn_to_moe import FFNToMoE
from moec.passes.routers import balancing_bias
from moec.passes.find_ffn import FindFFN
from moec.passes.lower_moe import LowerMoE
from moec.passes.sample_ffn_inputs import SampleFFNInputs
from moec.runtime.ops.moe import load_balance_loss, sequence_balance_loss
from moec.runtime.training.data import load_tokens
from tests.models import run
from tests.passes.test_router_init import E, K, VOCAB, Offset

_TEXT = torch.from_numpy(load_tokens(None).astype("int64")) % VOCAB
IDS = torch.stack([_TEXT[s:s + 64] for s in torch.randint(0, len(_TEXT) - 64, (64,), generator=torch.Generator().manual_seed(1)).tolist()])  # windows the calibration did not take


def _upcycled(lower=True, **options):
    model = Offset()
    gm = capture(model, (torch.zeros(2, 8, dtype=torch.long),))
    o = Options(experts=E, topk=K, **options)
    for p in (FindFFN(), SampleFFNInputs(o), FFNToMoE(o), *([LowerMoE()] if lower else [])):
        run(gm, p)
    return model, gm


def _imbalance(counts) -> float:
    counts = counts.float()
    return (counts.max() / counts.mean()).item()


def test_balancing_bias_evens_out_skewed_scores():
    gen = torch.Generator().manual_seed(0)
    scores = torch.softmax(torch.randn(1024, E, generator=gen) + torch.linspace(0, 2, E), -1)  # skewed
    bias = balancing_bias(scores, K)
    before = torch.bincount(torch.topk(scores, K).indices.flatten(), minlength=E)
    after = torch.bincount(torch.topk(scores + bias, K).indices.flatten(), minlength=E)
    assert _imbalance(before) > 2.0
    assert _imbalance(after) < 1.05
    assert bias.sum().abs() < 1e-6


@pytest.mark.parametrize("lower", [False, True])
def test_calibrated_bias_balances_from_step_0_and_keeps_the_dense_output(lower):
    _, plain = _upcycled(lower, router_init="random", expert_bias_rate=0.0)
    model, gm = _upcycled(lower, router_init="random", expert_bias_rate=1e-3)
    bias = gm.get_buffer("ffn.moe.router.bias")
    assert bias.shape == (E,) and bias.abs().sum() > 0 and "ffn.moe.router.bias" not in dict(gm.named_parameters())
    assert gm.meta["router_biases"] == ["ffn.moe.router.bias"]
    assert _imbalance(plain(IDS)["expert_counts"][0]) == pytest.approx(E / K)  # random rows collapse
    assert _imbalance(gm(IDS)["expert_counts"][0]) < 1.3
    with torch.no_grad():  # the bias only chooses which identical copies compute
        assert torch.allclose(gm(IDS)["logits"], model(IDS), rtol=1e-4, atol=1e-4)


def test_fine_grained_bias_keeps_the_blocks_tied():
    _, gm = _upcycled(router_init="random", expert_bias_rate=1e-3, granularity=4)
    bias = gm.get_buffer("ffn.moe.router.bias").view(E, 4)
    assert torch.equal(bias, bias[:, :1].expand(E, 4))
    counts = gm(IDS)["expert_counts"][0].view(E, 4)
    assert torch.equal(counts, counts[:, :1].expand(E, 4))  # top-(K*M) still takes K whole blocks


def test_force_balance_deals_every_expert_the_same_share():
    _, gm = _upcycled(router_init="random", force_balance=True)
    counts = gm(IDS)["expert_counts"][0]
    assert torch.equal(counts, torch.full((E,), IDS.numel() * K // E, dtype=counts.dtype))


def test_sequence_aux_loss_is_the_batch_loss_of_each_sequence_averaged():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3 * 5, E, generator=gen, requires_grad=True)
    indices = torch.topk(logits, K).indices.int()
    got = sequence_balance_loss(logits, indices, 3, "softmax")
    per_seq = []
    for b in range(3):
        rows = slice(5 * b, 5 * b + 5)
        counts = torch.bincount(indices[rows].flatten().long(), minlength=E)
        per_seq.append(load_balance_loss(counts, torch.softmax(logits[rows], -1).sum(0), K))
    assert got.item() == pytest.approx(torch.stack(per_seq).mean().item(), rel=1e-6)
    got.backward()
    assert logits.grad.abs().sum() > 0
    uniform = torch.zeros(8, E)
    assert sequence_balance_loss(uniform, torch.arange(8 * K).view(8, K).int() % E, 2, "softmax").item() == \
        pytest.approx(1.0)


def test_sequence_scope_reaches_the_aux_loss():
    model, seq = _upcycled(router_init="centered", aux_loss_scope="sequence", expert_bias_rate=0.0)
    _, batch = _upcycled(router_init="centered", expert_bias_rate=0.0)
    ids = (97 + torch.arange(8))[:, None].expand(8, 64)  # one letter per sequence: each routes alone
    h = (model.emb(ids) + model.offset).reshape(-1, model.offset.shape[0])  # the FFN's input
    logits = h @ seq.get_parameter("ffn.moe.router.weight").t()
    indices = torch.topk(torch.softmax(logits, -1), K).indices.int()
    with torch.no_grad():
        want = 0.01 * sequence_balance_loss(logits, indices, 8, "softmax")
        got, batch_scope = seq(ids)["aux_loss"], batch(ids)["aux_loss"]
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert got.item() > batch_scope.item() * 1.05  # each sequence is less even than the batch


def test_scaled_weights_equal_the_dense_model_under_a_uniform_router_only():
    model, gm = _upcycled(router_init="random", router_weights="scaled")
    with torch.no_grad():
        dense = model(IDS)
        assert not torch.allclose(gm(IDS)["logits"], dense, rtol=1e-3, atol=1e-3)
        gm.get_parameter("ffn.moe.router.weight").zero_()  # uniform softmax: each weight 1/E, times E/K
        assert torch.allclose(gm(IDS)["logits"], dense, rtol=1e-4, atol=1e-4)


def test_drop_upcycling_redraws_a_different_share_of_each_experts_units():
    model, gm = _upcycled(router_init="random", drop_upcycle=0.25, lower=False)
    dense_w1 = model.ffn[0].weight  # [F, D]
    w1 = gm.get_parameter("ffn.moe.experts.w1")  # [E, F, D]
    F = dense_w1.shape[0]
    changed = (w1 != dense_w1).any(-1)  # [E, F] units redrawn
    assert torch.equal(changed.sum(1), torch.full((E,), F // 4))
    assert len({tuple(row.nonzero().flatten().tolist()) for row in changed}) == E  # a different set each
    w2 = gm.get_parameter("ffn.moe.experts.w2")  # [E, D, F]: the same units' columns
    assert torch.equal((w2 != model.ffn[2].weight).any(1), changed)
    redrawn = w1[changed]
    assert redrawn.mean().item() == pytest.approx(dense_w1.mean().item(), abs=0.05)
    assert redrawn.std().item() == pytest.approx(dense_w1.std().item(), rel=0.1)


def test_a_config_from_before_the_bias_reads_back_without_one():
    old = {k: v for k, v in Options().to_json().items() if k != "expert_bias_rate"}
    assert Options.from_json(old).expert_bias_rate == 0.0  # its model has no router.bias to move
    assert Options.from_json(Options().to_json()).expert_bias_rate == 1e-3
