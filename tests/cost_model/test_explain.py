"""--explain substitutes into the sympy formulas; the planner evaluates lambdified
copies of them. Both must give the same numbers."""
import pytest

from moec.cost_model import best_plan, load_hardware
from moec.cost_model.explain import explain
from moec.cost_model.known_models import DEEPSEEKMOE_16B as MODEL


@pytest.fixture(scope="module")
def explained():
    hw = load_hardware("mi300x")
    plan = best_plan(MODEL.shape(), MODEL.moe, 32, hw)
    return plan, explain(plan, MODEL.shape(), MODEL.moe, hw)


def _value_after(text: str, heading: str) -> str:
    lines = text.splitlines()
    i = lines.index(f"  {heading}")
    return next(line for line in lines[i + 1:] if line.startswith("    = ")).removeprefix("    = ")


def test_explained_numbers_match_the_plan(explained):
    plan, text = explained
    assert _value_after(text, "step") == f"{plan.step_time_s * 1e3:.2f} ms"
    assert _value_after(text, "MFU") == f"{plan.mfu:.1%}"
    for term, value in plan.memory_bytes.items():
        assert _value_after(text, term) == f"{value / 2**30:.3f} GiB"


def test_explain_shows_substitutions_and_collective_derivation(explained):
    plan, text = explained
    assert f"EP = {plan.ep} " in text and "F_e = 1408 " in text
    assert f"a2a: dispatch/combine all-to-all over EP: {plan.collectives['a2a']['algorithm']}" in text
    assert "busiest link" in text


def test_every_symbol_substituted_says_what_it_is(explained):
    _, text = explained
    lines = text.splitlines()
    start = lines.index("Where (symbols and the numbers substituted):") + 1
    block = lines[start:lines.index("", start)]
    assert block and all(len(line[2:].split(None, 3)) == 4 for line in block), block  # NAME = VALUE MEANING
    assert any(line.lstrip().startswith("kappa = ") and "elementwise_passes" in line for line in block)
    assert any(line.lstrip().startswith("beta_mem = ") for line in block)
