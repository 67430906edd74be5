"""Published MoE sizes, counted on the graphs moec itself captures and upcycles
(meta device: no weights), against the papers and the cost model's formulas."""
from pathlib import Path

import pytest

from moec.driver.capture import build, capture, example_inputs, load_module
from moec.cost_model import params
from moec.cost_model.known_models import KNOWN_MODELS
from moec.cost_model.shape import model_values
from moec.base.options import Options
from moec.driver.pipeline import passes_for, run_pipeline
from moec.driver.stats import summary

LLAMA = Path(__file__).resolve().parent.parent / "examples" / "llama.py"
CASES = {  # known model -> (dense base config in examples/llama.py, moec compile options)
    "Mixtral-8x7B": ("mistral-7b", Options(experts=8, topk=2)),
    "DeepSeekMoE-16B": ("deepseekmoe-16b-base", Options(experts=32, topk=3, granularity=2, shared_experts=2,
                                                          first_dense=1)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_captured_moe_has_the_published_size(name):
    config, options = CASES[name]
    known = KNOWN_MODELS[name]
    mod = load_module(str(LLAMA))
    model = build(mod, "build_model", config, {}, "meta")
    gm, _ = run_pipeline(capture(model, example_inputs(mod, model, 2, 16, "meta")), passes_for(options))
    counted = summary(gm)
    assert counted["params"] == pytest.approx(known.published_total, rel=0.02)
    assert counted["active_params"] == pytest.approx(known.published_active, rel=0.02)
    v = model_values(known.shape(), known.moe)
    assert counted["params"] == pytest.approx(float(params.total.xreplace(v)), rel=0.005)
    assert counted["active_params"] == pytest.approx(float(params.active.xreplace(v)), rel=0.005)
