"""Hash and expert-choice routing against plain loops over tokens and experts: forward, gradients, the
balanced hash table, the exact start of hash layers, and the causal leak of expert choice."""
import pytest
import torch
import torch.nn.functional as F

from moec.base.options import Options
from moec.driver.capture import capture
from moec.passes.ffn_to_moe import FFNToMoE
from moec.passes.routers import hash_table
from moec.passes.find_ffn import FindFFN
from moec.passes.lower_moe import LowerMoE
from moec.passes.sample_ffn_inputs import SampleFFNInputs
from moec.runtime.ops.moe import moe_layer
from tests.models import run
from tests.passes.test_router_init import Offset

T, D, F_, E, K = 24, 8, 16, 4, 2
moec = torch.ops.moec


def _experts(gen):
    w1 = torch.randn(E, F_, D, generator=gen, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(E, D, F_, generator=gen, dtype=torch.float64, requires_grad=True)
    return w1, w2


def _expert(x, w1, w2, e):
    return F.relu(x @ w1[e].t()) @ w2[e].t()


def _layer(x, logits, hashed, w1, w2, routing):
    out = moe_layer(x, logits, None, hashed, w1, None, None, None, w2, None, k=K, score="softmax", renorm=True,
                    weight_scale=1, capacity_factor=0.0, activation="relu", routing=routing)
    return out[0], out[1]


def test_choose_tokens_takes_each_experts_top_scores_lower_token_first_on_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (T, E), generator=gen).float()  # many ties
    C = 7
    row_map, offsets = moec.choose_tokens(scores, C)
    assert offsets.tolist() == [e * C for e in range(E + 1)]
    rows = row_map.view(T, E)
    for e in range(E):
        ranked = sorted(range(T), key=lambda t: (-scores[t, e].item(), t))[:C]
        taken = sorted(ranked)
        assert [t for t in range(T) if rows[t, e] >= 0] == taken
        assert [rows[t, e].item() for t in taken] == list(range(e * C, (e + 1) * C))  # token order


def test_expert_choice_matches_a_loop_over_experts_forward_and_backward():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(T, E, generator=gen, dtype=torch.float64, requires_grad=True)
    w1, w2 = _experts(gen)
    out, counts = _layer(x, logits, None, w1, w2, "expert-choice")
    C = T * K // E
    assert counts.tolist() == [C] * E
    scores = torch.softmax(logits, -1)
    want = torch.zeros(T, D, dtype=torch.float64)
    chosen = [set(torch.topk(scores[:, e], C).indices.tolist()) for e in range(E)]
    for t in range(T):
        mine = [e for e in range(E) if t in chosen[e]]
        total = sum(scores[t, e] for e in mine)
        for e in mine:
            want[t] = want[t] + scores[t, e] / total * _expert(x[t], w1, w2, e)
    assert torch.allclose(out, want, rtol=1e-10, atol=1e-12)
    g = torch.randn(T, D, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out * g).sum(), (x, logits, w1, w2))
    ref = torch.autograd.grad((want * g).sum(), (x, logits, w1, w2))
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_a_hash_layer_averages_the_experts_its_table_gives_forward_and_backward():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64, requires_grad=True)
    w1, w2 = _experts(gen)
    hashed = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).int()
    out, counts = _layer(x, None, hashed, w1, w2, "topk")
    assert counts.tolist() == torch.bincount(hashed.flatten().long(), minlength=E).tolist()
    want = torch.stack([sum(_expert(x[t], w1, w2, e) for e in hashed[t].tolist()) / K for t in range(T)])
    assert torch.allclose(out, want, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(out.sum(), (x, w1, w2))
    ref = torch.autograd.grad(want.sum(), (x, w1, w2))
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_the_hash_table_balances_skewed_token_frequencies():
    frequency = torch.tensor([1000, 500, 400, 300, 200, 100, 50, 0, 0, 0])
    M = 2
    table = hash_table(10, E, K, M, torch.Generator().manual_seed(0), torch.device("cpu"), frequency)
    assert table.shape == (10, K * M)
    blocks = table.view(10, K, M)[:, :, 0] // M
    assert torch.equal(table.view(10, K, M) % M, torch.arange(M).expand(10, K, M))  # whole blocks
    assert all(len(set(row.tolist())) == K for row in blocks)
    load = torch.zeros(E)
    for v, row in enumerate(blocks):
        load[row] += frequency[v]
    naive = torch.zeros(E)
    for v in range(10):  # the first K experts for every id: all of it on two
        naive[:K] += frequency[v]
    assert load.max() / load.mean() < 1.25 < naive.max() / naive.mean()


def _upcycled(**options):
    model = Offset()
    gm = capture(model, (torch.zeros(2, 8, dtype=torch.long),))
    o = Options(experts=E, topk=K, **options)
    for p in (FindFFN(), SampleFFNInputs(o), FFNToMoE(o), LowerMoE()):
        run(gm, p)
    return model, gm


def test_a_hash_layer_starts_as_the_dense_model():
    model, gm = _upcycled(hash_layers=(0,))
    assert "ffn.moe.router.weight" not in dict(gm.named_parameters())
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = gm(ids)
        assert torch.allclose(out["logits"], model(ids), rtol=1e-4, atol=1e-4)
    table = gm.get_buffer("ffn.moe.router.table")
    assert torch.equal(out["expert_counts"][0], torch.bincount(table[ids.flatten()].flatten().long(), minlength=E).int())


def test_expert_choice_leaks_later_tokens_into_earlier_outputs_and_top_k_does_not():
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    changed[0, 16:] = (changed[0, 16:] + 7) % 256  # only the second half differs
    for routing, leaks in (("topk", False), ("expert-choice", True)):
        _, gm = _upcycled(routing=routing, router_init="random")
        with torch.no_grad():
            a, b = gm(ids)["logits"][0, :16], gm(changed)["logits"][0, :16]
        assert torch.equal(a, b) != leaks, routing
    with pytest.raises(Exception, match="does not combine with --ep"):
        Options(experts=E, topk=K, routing="expert-choice", ep=2).validate()


def test_hash_layers_with_their_own_generators_route_differently():
    frequency = torch.tensor([1000, 500, 400, 300, 200, 100, 50, 25, 10, 5])
    tables = [hash_table(10, E, K, 1, torch.Generator().manual_seed(s), torch.device("cpu"), frequency)
              for s in (1, 2)]
    assert not torch.equal(tables[0], tables[1])
    for table in tables:  # still balanced
        load = torch.zeros(E)
        for v, row in enumerate(table.long()):
            load[row] += frequency[v]
        assert load.max() / load.mean() < 1.25
