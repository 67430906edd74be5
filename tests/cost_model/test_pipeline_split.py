"""Where the layers are cut into pipeline stages, and the bubble a schedule leaves."""
import re

import pytest
import sympy as sp

from moec.base.errors import MoecError
from moec.cost_model import load_hardware, memory, rank_plans
from moec.cost_model import symbols as s
from moec.cost_model.known_models import MIXTRAL_8X7B
from moec.cost_model.pipeline import bubble, cut, split, stage_memory
from moec.cost_model.planner import values_for


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
    from moec.cost_model.explain import explain

    ranked, _ = rank_plans(MIXTRAL_8X7B.shape(), MIXTRAL_8X7B.moe, 64, "dgx_h100")
    plan = next(p for p in ranked if p.pp == 2)
    text = explain(plan, MIXTRAL_8X7B.shape(), MIXTRAL_8X7B.moe, load_hardware("dgx_h100"))
    m = plan.micro_batches
    assert f"Pipeline (2 stages, 1F1B, {m} micro-batches):" in text
    assert re.search(r"stages \(layers, share of the forward FLOPs, peak GiB; .*\): 0-15 50% [\d.]+, 16-31 50% [\d.]+",
                     text), text
    assert f"bubble: (PP - 1) / (M + PP - 1) = {1 / (m + 1):.1%}" in text


def test_a_stage_that_would_not_fit_gives_up_layers_and_nothing_fitting_is_an_error():
    fits = lambda stage, a, b: b - a <= 2  # noqa: E731  (a stand-in memory: at most two layers a stage)
    assert split([1.0, 1.0, 1.0, 1.0, 4.0], 2) == [0, 4, 5]
    with pytest.raises(MoecError, match="no cut of the 5 layers into 2 pipeline stages fits each stage's memory"):
        split([1.0, 1.0, 1.0, 1.0, 4.0], 2, fits=fits)
    assert split([1.0, 1.0, 1.0, 4.0], 2, fits=fits) == [0, 2, 4]  # time alone says [0, 3, 4]


def _plan(gpus, pp):
    shape, moe, hw = MIXTRAL_8X7B.shape(), MIXTRAL_8X7B.moe, load_hardware("dgx_h100")
    ranked, _ = rank_plans(shape, moe, gpus, hw)
    plan = next(p for p in ranked if p.pp == pp)
    return shape, moe, hw, plan, values_for(plan, shape, moe, hw)


def test_one_stage_holds_what_the_whole_model_memory_formula_says():
    shape, moe, hw, plan, values = _plan(64, 1)
    whole = float(s.expand(memory.peak).xreplace(values).evalf())
    assert stage_memory(shape, moe, values, 1)(0, 0, shape.layers) == pytest.approx(whole, rel=1e-9)


def test_the_first_stage_keeps_more_micro_batches_in_flight_and_a_tight_memory_moves_its_layers():
    shape, moe, hw, plan, values = _plan(64, 2)
    bounds, _, held = cut(shape, moe, 2, values)
    middle = stage_memory(shape, moe, values, 2)
    assert bounds == [0, 16, 32] and held[0] > held[1]
    # the first stage's 16 layers hold more than the last's 16 (whose head and logits the model adds)
    tight = sp.Rational(1, 2) * (held[0] + max(held[1], middle(1, 15, 32)))
    bounds, _, fitted = cut(shape, moe, 2, values, float(tight))
    assert bounds[1] < 16 and max(fitted) <= tight


def test_a_plan_whose_stages_cannot_each_fit_a_gpu_is_not_the_planners_choice():
    from dataclasses import replace

    from moec.cost_model.planner import _stages_fit
    shape, moe, hw, plan, values = _plan(64, 2)
    assert _stages_fit(plan, shape, moe, hw)
    assert not _stages_fit(plan, shape, moe, replace(hw, memory_bytes=plan.peak_memory_bytes / 4))
