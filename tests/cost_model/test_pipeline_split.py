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


def test_a_pipelined_plan_is_ranked_and_fitted_by_the_largest_stage_of_its_cut():
    """The plan's peak is the largest stage's of the cut the compile makes (the fastest whose stages each fit),
    not memory.peak's average stage; a plan whose average stage fits and none of whose cuts does is not ranked."""
    from dataclasses import replace

    shape, moe, hw = MIXTRAL_8X7B.shape(), MIXTRAL_8X7B.moe, load_hardware("dgx_h100")
    ranked, _ = rank_plans(shape, moe, 64, hw)
    piped = [p for p in ranked if p.pp > 1]
    for p in piped[:5]:
        held = cut(shape, moe, p.pp, values_for(p, shape, moe, hw), hw.memory_bytes)[2]
        assert p.stage_peak_bytes == pytest.approx(held) and p.peak_memory_bytes == max(held) <= hw.memory_bytes

    def average_of(p):
        return float(s.expand(memory.peak).xreplace(values_for(p, shape, moe, hw)))

    # a plan whose largest stage (the first: PP micro-batches in flight; or the last: the head and logits)
    # outweighs its average stage
    plan = next(p for p in piped if average_of(p) < p.peak_memory_bytes)
    assert plan.stage_peak_bytes == pytest.approx(cut(shape, moe, plan.pp, values_for(plan, shape, moe, hw),
                                                      hw.memory_bytes)[2])
    average = average_of(plan)
    # on a GPU between the two, no cut of it fits: it is not ranked, though its average stage would fit
    between = replace(hw, memory_bytes=(average + plan.peak_memory_bytes) / 2)
    with pytest.raises(MoecError, match="no cut"):
        cut(shape, moe, plan.pp, values_for(plan, shape, moe, between), between.memory_bytes)
    again, _ = rank_plans(shape, moe, 64, between)
    assert plan.label() not in [p.label() for p in again]
    assert all(p.peak_memory_bytes <= between.memory_bytes for p in again)


def test_the_stage_that_does_not_fit_is_what_a_pipelined_plan_needs():
    """No cut fits: the plan's peak is its fastest cut's largest stage, over the GPU, and it is not ranked."""
    from dataclasses import replace

    from moec.cost_model.planner import Plan, _cut_stages, predict
    from moec.cost_model.layout import Layout
    shape, moe, hw = MIXTRAL_8X7B.shape(), MIXTRAL_8X7B.moe, load_hardware("dgx_h100")
    tiny = replace(hw, memory_bytes=2**30)
    plan = Plan(8, 1, 1, 4, 0, False, 1, 8, 32, hw.name, shape.name)
    plan = _cut_stages(predict(plan, shape, moe, tiny, Layout(tiny, 32, 2, 0).costs(8, 1, 1, 4)), shape, moe, tiny)
    held = cut(shape, moe, 4, values_for(plan, shape, moe, tiny))[2]
    assert plan.peak_memory_bytes == max(held) > tiny.memory_bytes
