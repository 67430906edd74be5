"""Where the layers are cut into pipeline stages, and the bubble a schedule leaves."""
import pytest

from moec.base.errors import MoecError
from moec.cost_model.pipeline import bubble, split


def test_the_split_balances_time_not_layer_count():
    assert split([1.0] * 4, 2) == [0, 2, 4]
    assert split([1.0] * 4, 2, last=2.0) == [0, 3, 4]  # the head makes the last stage heavier: it gets fewer layers
    assert split([1.0] * 4, 2, first=2.0) == [0, 1, 4]
    assert split([4.0, 1.0, 1.0, 1.0, 1.0], 2) == [0, 1, 5]


@pytest.mark.parametrize("costs,stages", [([1.0, 2.0, 3.0, 1.0, 5.0, 2.0], 3), ([3.0, 1.0, 1.0, 2.0, 2.0], 4)])
def test_the_split_is_the_best_contiguous_one(costs, stages):
    """Against every way of cutting: no cut has a lighter heaviest stage."""
    from itertools import combinations
    heaviest = lambda b: max(sum(costs[x:y]) for x, y in zip(b, b[1:]))  # noqa: E731
    best = min(heaviest([0, *c, len(costs)]) for c in combinations(range(1, len(costs)), stages - 1))
    got = split(costs, stages)
    assert len(got) == stages + 1 and all(a < b for a, b in zip(got, got[1:]))
    assert heaviest(got) == best


def test_more_stages_than_layers_is_an_error():
    with pytest.raises(MoecError, match="3 pipeline stages need at least 3 layers, and the model has 2"):
        split([1.0, 1.0], 3)


def test_bubble_shrinks_with_micro_batches_and_virtual_stages():
    assert bubble(2, 2, "1f1b") == pytest.approx(1 / 3)
    assert bubble(4, 8, "1f1b") == pytest.approx(3 / 11)
    assert bubble(4, 8, "interleaved-1f1b") == pytest.approx(3 / 19)
    assert bubble(1, 8, "1f1b") == 0


def test_explain_shows_the_stage_split_and_the_bubble_of_a_pipelined_plan():
    from moec.cost_model import load_hardware, rank_plans
    from moec.cost_model.explain import explain
    from moec.cost_model.known_models import MIXTRAL_8X7B

    ranked, _ = rank_plans(MIXTRAL_8X7B.shape(), MIXTRAL_8X7B.moe, 64, "dgx_h100")
    plan = next(p for p in ranked if p.pp == 2)
    text = explain(plan, MIXTRAL_8X7B.shape(), MIXTRAL_8X7B.moe, load_hardware("dgx_h100"))
    m = plan.micro_batches
    assert f"Pipeline (2 stages, 1F1B, {m} micro-batches):" in text
    assert "stages (layers, share of the forward FLOPs; the last carries the head): 0-15 50%, 16-31 50%" in text
    assert f"bubble: (PP - 1) / (M + PP - 1) = {1 / (m + 1):.1%}" in text
