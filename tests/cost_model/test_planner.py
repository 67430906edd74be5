"""The planner: enumeration, constraints, ranking, plan.json."""
import copy
import json
from dataclasses import replace

import pytest
import sympy as sp

from moec.base.errors import MoecError
from moec.cost_model import Plan, best_plan, load_hardware, params, rank_plans
from moec.cost_model.known_models import DEEPSEEKMOE_16B, MIXTRAL_8X7B
from moec.cost_model.report import plan_record, table
from moec.cost_model.shape import model_values
from moec.cost_model.symbols import f


@pytest.fixture(scope="module")
def mixtral_64():
    return rank_plans(MIXTRAL_8X7B.shape(), MIXTRAL_8X7B.moe, 64, "dgx_h100")


def test_candidates_respect_constraints_and_memory(mixtral_64):
    ranked, enumerated = mixtral_64
    hw = load_hardware("dgx_h100")
    assert 0 < len(ranked) <= enumerated
    for p in ranked:
        assert p.ep * p.dp * p.tp * p.pp == 64
        assert p.tp <= hw.gpus_per_node and 8 % p.ep == 0 and 32 % p.pp == 0
        assert p.peak_memory_bytes <= hw.memory_bytes
        assert not (p.zero == 3 and p.pp > 1)
        assert p.step_time_s == pytest.approx(sum(p.time_s.values()))
        assert 0 < p.mfu < 1
    times = [p.step_time_s for p in ranked]
    assert times == sorted(times)


def test_some_candidates_are_dropped_for_memory(mixtral_64):
    ranked, enumerated = mixtral_64
    assert len(ranked) < enumerated


def test_expert_parallelism_wins_for_many_experts():
    """With 64 experts, short expert GEMMs without EP cost more than the all-to-all."""
    shape = DEEPSEEKMOE_16B.shape()
    plan = best_plan(shape, DEEPSEEKMOE_16B.moe, 64, "frontier")
    assert plan.ep > 1
    assert plan.why.startswith(plan.label())


def test_nothing_fits_is_a_user_error():
    with pytest.raises(MoecError, match="no parallel plan"):
        best_plan(MIXTRAL_8X7B.shape(), MIXTRAL_8X7B.moe, 2, "dgx_h100")
    with pytest.raises(MoecError, match="global batch of 1;"):
        best_plan(MIXTRAL_8X7B.shape(), MIXTRAL_8X7B.moe, 16, "dgx_h100", global_batch=1)


def test_plan_json_records_choice_and_reason(mixtral_64):
    ranked, enumerated = mixtral_64
    record = json.loads(json.dumps(plan_record(ranked, enumerated, MIXTRAL_8X7B.shape(), MIXTRAL_8X7B.moe)))
    assert record["chosen"]["ep"] == ranked[0].ep
    assert record["why"] == ranked[0].why and "next best" in record["why"]
    assert record["runners_up"][0]["plan"] == ranked[1].label()
    assert Plan(**json.loads(ranked[0].to_json())).label() == ranked[0].label()
    assert table(ranked, 3).count("\n") == 4  # header, rule, three rows


def test_moe_layers_read_off_a_graph_override_the_pattern():
    shape = replace(MIXTRAL_8X7B.shape(), moe_layers=(True, False) * 16)
    v = model_values(shape, MIXTRAL_8X7B.moe)
    assert v[f] == sp.Rational(1, 2)
    assert float(params.total.xreplace(v)) < 0.6 * MIXTRAL_8X7B.published_total


def test_hardware_errors_say_what_to_do(tmp_path):
    with pytest.raises(MoecError, match="frontier"):
        load_hardware("frontier2")
    profile = copy.deepcopy(load_hardware("dgx_h100").raw)
    profile["node"]["nics"] = []
    path = tmp_path / "one-node.json"
    path.write_text(json.dumps(profile))
    with pytest.raises(MoecError, match="no NICs"):
        best_plan(MIXTRAL_8X7B.shape(), MIXTRAL_8X7B.moe, 16, str(path))
