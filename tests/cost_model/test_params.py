"""Parameter formulas against the published MoE sizing and real models."""
import importlib.util
from pathlib import Path

import pytest
import sympy as sp
import torch

from moec.cost_model import params
from moec.cost_model.known_models import KNOWN_MODELS
from moec.base.options import Options
from moec.cost_model.shape import ModelShape, model_values
from moec.cost_model.symbols import D, E, F, F_e, G, H, H_kv, L, N_s, f, n_W

# GPT-3 family (Brown et al. 2020, Table 2.1): the dense bases of the
# DeepSpeed-MoE / Frontier MoE design space
GPT_BASES = {"350M": (24, 1024), "1.3B": (24, 2048), "6.7B": (32, 4096), "13B": (40, 5120)}


def gpt(layers, hidden):
    return ModelShape(layers=layers, hidden=hidden, ffn=4 * hidden, vocab=50257, heads=hidden // 64,
                      kv_heads=hidden // 64, gated=False, tied_embeddings=True, seq_len=2048)


def test_blocks_reduce_to_published_closed_form():
    gpt_blocks = params.blocks.subs({F: 4 * D, F_e: 4 * D, n_W: 2, H_kv: H, G: 1, N_s: 0})
    assert sp.simplify(gpt_blocks - 4 * L * D**2 * (3 + 2 * f * E - 2 * f)) == 0


@pytest.mark.parametrize("base", ["1.3B", "6.7B", "13B"])
@pytest.mark.parametrize("experts", [8, 16, 32, 48, 64, 128])
@pytest.mark.parametrize("every", [1, 2])
def test_design_space_matches_closed_form(base, experts, every):
    """The DeepSpeed-MoE / Frontier design space: blocks plus routers within 2 % of
    4 L D^2 (3 + 2 f E - 2 f), i.e. (1 + 2 f (E - 1) / 3) times the dense blocks,
    which is the (1 + 2 f E / 3) M rule for large E."""
    layers, hidden = GPT_BASES[base]
    v = model_values(gpt(layers, hidden), Options(experts=experts, topk=1, moe_every=every))
    blocks = float((params.total - params.embeddings).xreplace(v))
    closed = 4 * layers * hidden**2 * (3 + 2 * (1 / every) * experts - 2 * (1 / every))
    assert blocks == pytest.approx(closed, rel=0.02)


@pytest.mark.parametrize("base,experts,published", [("350M", 128, 13e9), ("1.3B", 128, 52e9)])
def test_deepspeed_moe_published_sizes(base, experts, published):
    """DeepSpeed-MoE (Rajbhandari et al. 2022): 350M+MoE-128 is 13B and
    1.3B+MoE-128 is 52B, with MoE on every other layer."""
    v = model_values(gpt(*GPT_BASES[base]), Options(experts=experts, topk=1, moe_every=2))
    assert float(params.total.xreplace(v)) == pytest.approx(published, rel=0.02)


@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_known_models_total_and_active(name):
    m = KNOWN_MODELS[name]
    v = model_values(m.shape(), m.moe)
    assert float(params.total.xreplace(v)) == pytest.approx(m.published_total, rel=0.02)
    assert float(params.active.xreplace(v)) == pytest.approx(m.published_active, rel=0.02)


def test_granularity_keeps_parameters_and_flops():
    shape = gpt(24, 2048)
    coarse = model_values(shape, Options(experts=8, topk=2))
    fine = model_values(shape, Options(experts=8, topk=2, granularity=4))
    expert_part = params.total - f * L * params.router  # the router grows with E*G
    assert expert_part.subs(coarse) == expert_part.subs(fine)
    assert (params.flops_forward - 2 * f * L * params.router).subs(coarse) == \
        (params.flops_forward - 2 * f * L * params.router).subs(fine)


def _load_example(name):
    path = Path(__file__).resolve().parents[2] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_dense_base_count_matches_torch_model(name):
    """f = 0 gives the dense base: build it from the example with the known
    model's config (meta device) and count its weights, norms aside."""
    m = KNOWN_MODELS[name]
    example = _load_example(Path(m.example).stem)
    with torch.device("meta"):
        model = example.build_model("tiny", **m.base)
    counted = sum(p.numel() for n, p in model.named_parameters() if "norm" not in n)
    v = model_values(m.shape(), m.moe)
    v[f] = 0
    assert params.total.xreplace(v) == counted
