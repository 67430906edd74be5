"""Router initialisation: on hidden states that share a large mean direction (as a trained model's do),
random router rows send every token to the same experts; the data-aware inits route evenly from step 0,
and every init keeps the upcycled model equal to the dense one."""
import pytest
import torch
import torch.nn as nn

from moec.base.options import Options
from moec.driver.capture import capture
from moec.passes.ffn_to_moe import FFNToMoE
from moec.passes.routers import router_rows
from moec.passes.find_ffn import FindFFN
from moec.passes.sample_ffn_inputs import SampleFFNInputs
from tests.models import run

VOCAB, D, E, K = 256, 32, 8, 2


class Offset(nn.Module):
    """Token embeddings plus a shared vector 20x their size, then an FFN: every FFN input points the
    same way."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, D)
        self.offset = nn.Parameter(torch.randn(D) * 20)
        self.ffn = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        h = self.emb(ids) + self.offset
        return self.head(h + self.ffn(h))


def _upcycled(init: str):
    model = Offset()
    gm = capture(model, (torch.zeros(2, 8, dtype=torch.long),))
    o = Options(experts=E, topk=K, router_init=init, expert_bias_rate=0.0)  # the rows alone
    for p in (FindFFN(), SampleFFNInputs(o), FFNToMoE(o)):
        run(gm, p)
    return model, gm


def _load(gm, ids) -> float:
    counts = gm(ids)["expert_counts"][0].float()
    return (counts.max() / counts.mean()).item()


@pytest.mark.parametrize("init", ["centered", "kmeans"])
def test_data_aware_inits_route_evenly_where_random_rows_collapse(init):
    ids = torch.randint(0, VOCAB, (16, 64), generator=torch.Generator().manual_seed(1))  # not the calibration
    _, random_gm = _upcycled("random")
    model, gm = _upcycled(init)
    assert _load(random_gm, ids) == pytest.approx(E / K)  # every token to the same K experts
    assert _load(gm, ids) < 2.0  # 1.42 centered, 1.59 kmeans
    with torch.no_grad():
        assert torch.allclose(gm(ids)["logits"], model(ids), rtol=1e-4, atol=1e-4)  # step-0 equivalence


def test_rows_are_orthogonal_to_the_mean_and_keep_the_random_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, D, generator=gen) + 5
    for init in ("centered", "kmeans"):
        rows = router_rows(E, D, torch.Generator().manual_seed(0), init, x)
        assert rows.shape == (E, D)
        assert (rows @ x.mean(0)).abs().max() < 1e-4 * rows.norm() * x.mean(0).norm()
        assert rows.norm(dim=1).mean() == pytest.approx(0.02 * D ** 0.5, rel=0.3)
    assert torch.equal(router_rows(E, D, torch.Generator().manual_seed(3), "random", x),
                       router_rows(E, D, torch.Generator().manual_seed(3), "centered", None))  # no data: random


def test_a_graph_without_weights_samples_nothing():
    with torch.device("meta"):
        model = Offset()
    gm = capture(model, (torch.zeros(2, 8, dtype=torch.long, device="meta"),))
    run(gm, FindFFN())
    p = SampleFFNInputs(Options(experts=E, topk=K))
    run(gm, p)
    assert gm.meta["ffn_inputs"] == {}
    assert p.report(gm) == ["nothing sampled (no weights at compile time)"] and p.warnings(gm) == []


class Positions(Offset):
    """A learned position table of `rows` rows: longer windows do not fit."""

    def __init__(self, rows):
        super().__init__()
        self.pos = nn.Embedding(rows, D)

    def forward(self, ids):
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1])) + self.offset
        return self.head(h + self.ffn(h))


def _sampled(model):
    gm = capture(model, (torch.zeros(2, 8, dtype=torch.long),))
    run(gm, FindFFN())
    p = SampleFFNInputs(Options(experts=E, topk=K))
    run(gm, p)
    return gm, p


def test_calibration_windows_span_the_training_positions_the_context_allows():
    gm, p = _sampled(Offset())
    assert gm.meta["ffn_inputs"]["ffn"].shape == (16 * 128, D) and p.warnings(gm) == []
    gm, p = _sampled(Positions(64))  # 128-token windows do not fit: 32-token ones
    assert gm.meta["ffn_inputs"]["ffn"].shape == (32 * 32, D) and p.warnings(gm) == []


def test_a_model_that_fails_on_calibration_tokens_starts_random_and_says_so():
    gm, p = _sampled(Positions(16))
    assert gm.meta["ffn_inputs"] == {}
    [line] = p.warnings(gm)
    assert line.startswith("no calibration (the dense model failed on 32 x 32 calibration tokens: ")
    assert line.endswith("routers start random")
