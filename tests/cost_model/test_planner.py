"""The planner: enumeration, constraints, ranking, plan.json."""
import copy
import json
from dataclasses import replace

import pytest
import sympy as sp

from moec.base.errors import MoecError
from moec.cost_model import Plan, best_plan, load_hardware, params, rank_plans
from moec.cost_model.known_models import DEEPSEEKMOE_16B, MIXTRAL_8X7B
from moec.base.options import Options
from moec.cost_model.report import COLUMNS, plan_record, table
from moec.cost_model.shape import ModelShape, model_values
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


# examples/llama.py's default configuration
TINY_LLAMA = ModelShape(layers=4, hidden=128, ffn=384, vocab=256, heads=4, kv_heads=2, gated=True,
                        tied_embeddings=False, seq_len=256, name="llama.py:default")


@pytest.mark.parametrize("shape,moe,gpus", [(TINY_LLAMA, Options(experts=8, topk=2), 16),
                                            (MIXTRAL_8X7B.shape(), MIXTRAL_8X7B.moe, 64)])
def test_recompute_never_makes_the_same_plan_faster(shape, moe, gpus):
    ranked, _ = rank_plans(shape, moe, gpus, "dgx_h100")
    steps = {}
    for p in ranked:
        steps.setdefault((p.ep, p.dp, p.tp, p.pp, p.zero), {})[p.recompute] = p.step_time_s
    pairs = [s for s in steps.values() if len(s) == 2]
    assert pairs and all(s[True] > s[False] for s in pairs)
    if shape is TINY_LLAMA:  # everything fits: nothing calls for recomputation
        assert not ranked[0].recompute


def test_plan_table_columns_add_up(mixtral_64):
    ranked, _ = mixtral_64
    header, _, *rows = table(ranked, 5).splitlines()
    for line, plan in zip(rows, ranked):
        rank, rest = line.split(plan.label())
        cells = dict(zip(COLUMNS, [rank.strip(), plan.label(), *rest.split()], strict=True))
        num = lambda c: float(cells[c].replace(",", "").rstrip("%"))  # noqa: E731
        memory = num("params+opt GiB") + max(num("grads GiB"), num("transient GiB"))
        if plan.pp == 1:
            assert num("peak GiB") == pytest.approx(memory, abs=0.15)
        else:  # the columns are an average stage's, the peak the largest stage's of the cut
            assert num("peak GiB") == pytest.approx(max(plan.stage_peak_bytes) / 2**30, abs=0.05)
        times = [c for c in COLUMNS if c.endswith(" ms") and c != "step ms"]
        assert num("step ms") == pytest.approx(sum(num(c) for c in times), abs=len(times) / 2)
        assert num("step ms") == pytest.approx(plan.step_time_s * 1e3, abs=0.5)
