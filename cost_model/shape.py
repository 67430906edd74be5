"""What the cost model needs to know about a model and its MoE options.

ModelShape describes the dense model as captured (filled from the graph by the
capture step, or by hand); moec.base.options.Options holds the MoE choices.
Together they give the numbers substituted into the formulas.
"""
from dataclasses import dataclass
from typing import Optional

import sympy as sp

from moec.base.errors import MoecError
from moec.base.options import Options
from moec.cost_model import symbols as s


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    ffn: int
    vocab: int
    heads: int
    kv_heads: int
    gated: bool
    tied_embeddings: bool
    seq_len: int
    name: str = "model"
    # which layers are MoE, when read off a graph that already has them;
    # None: the options' first_dense / moe_every decide
    moe_layers: Optional[tuple[bool, ...]] = None


def check_moe(shape: ModelShape, moe: Options) -> None:
    """The MoE options against the model's dimensions (the model-free checks are Options.validate's)."""
    if moe.expert_ffn is None and shape.ffn % moe.granularity:
        raise MoecError(f"--granularity {moe.granularity} does not divide the FFN width {shape.ffn}; "
                        "pick a divisor of it")
    if shape.moe_layers is not None and len(shape.moe_layers) != shape.layers:
        raise MoecError(f"ModelShape.moe_layers has {len(shape.moe_layers)} entries for {shape.layers} layers")
    if not any(moe_layer_flags(shape, moe)):
        raise MoecError(f"--first-dense {moe.first_dense} leaves no MoE layer in a {shape.layers}-layer "
                        "model; lower it")


def moe_layer_flags(shape: ModelShape, moe: Options) -> list[bool]:
    if shape.moe_layers is not None:
        return list(shape.moe_layers)
    return [moe.is_moe_layer(i) for i in range(shape.layers)]


def model_values(shape: ModelShape, moe: Options) -> dict:
    """Substitutions for the model and MoE symbols."""
    check_moe(shape, moe)
    n_moe = sum(moe_layer_flags(shape, moe))
    return {
        s.L: shape.layers, s.D: shape.hidden, s.F: shape.ffn, s.V: shape.vocab, s.H: shape.heads,
        s.H_kv: shape.kv_heads, s.t: int(shape.tied_embeddings), s.n_W: 3 if shape.gated else 2,
        s.S: shape.seq_len, s.E: moe.experts, s.K: moe.topk, s.G: moe.granularity, s.N_s: moe.shared_experts,
        s.F_e: moe.expert_ffn or shape.ffn // moe.granularity, s.f: sp.Rational(n_moe, shape.layers),
        s.Q: int(moe.sequence_parallel),
    }
