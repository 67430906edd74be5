"""What the cost model needs to know about a model and its MoE options.

ModelShape describes the dense model as captured (filled from the graph by the
capture step, or by hand); MoeOptions are the `moec compile` MoE flags. Together
they give the numbers substituted into the formulas.
"""
from dataclasses import dataclass
from typing import Optional

import sympy as sp

from moec.base.errors import MoecError
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
    # None: MoeOptions' first_dense / moe_every decide
    moe_layers: Optional[tuple[bool, ...]] = None


@dataclass(frozen=True)
class MoeOptions:
    experts: int
    topk: int
    granularity: int = 1
    shared_experts: int = 0
    first_dense: int = 0
    moe_every: int = 1
    # expert width when it is not ffn / granularity (models trained from scratch)
    expert_ffn: Optional[int] = None
    # node-limited routing: a token's experts lie on at most this many nodes (0: no limit)
    max_nodes_per_token: int = 0

    def moe_layers(self, layers: int) -> list[bool]:
        """Which layers are MoE: every moe_every-th layer after the first first_dense."""
        return [i >= self.first_dense and (i - self.first_dense) % self.moe_every == 0 for i in range(layers)]

    def check(self, shape: ModelShape) -> None:
        if min(self.experts, self.granularity, self.moe_every) < 1 or min(self.shared_experts, self.first_dense) < 0:
            raise MoecError("--experts, --granularity and --moe-every must be at least 1, --shared-experts and "
                            "--first-dense at least 0")
        if self.topk > self.experts or self.topk < 1:
            raise MoecError(f"--topk {self.topk} must be between 1 and --experts {self.experts}")
        if self.expert_ffn is None and shape.ffn % self.granularity:
            raise MoecError(f"--granularity {self.granularity} does not divide the FFN width {shape.ffn}; "
                            "pick a divisor of it")
        if shape.moe_layers is not None and len(shape.moe_layers) != shape.layers:
            raise MoecError(f"ModelShape.moe_layers has {len(shape.moe_layers)} entries for {shape.layers} layers")
        if not any(_moe_layers(shape, self)):
            raise MoecError(f"--first-dense {self.first_dense} leaves no MoE layer in a {shape.layers}-layer "
                            "model; lower it")


def _moe_layers(shape: ModelShape, moe: MoeOptions) -> list[bool]:
    return list(shape.moe_layers) if shape.moe_layers is not None else moe.moe_layers(shape.layers)


def model_values(shape: ModelShape, moe: MoeOptions) -> dict:
    """Substitutions for the model and MoE symbols."""
    moe.check(shape)
    n_moe = sum(_moe_layers(shape, moe))
    return {
        s.L: shape.layers, s.D: shape.hidden, s.F: shape.ffn, s.V: shape.vocab, s.H: shape.heads,
        s.H_kv: shape.kv_heads, s.t: int(shape.tied_embeddings), s.n_W: 3 if shape.gated else 2,
        s.S: shape.seq_len, s.E: moe.experts, s.K: moe.topk, s.G: moe.granularity, s.N_s: moe.shared_experts,
        s.F_e: moe.expert_ffn or shape.ffn // moe.granularity, s.f: sp.Rational(n_moe, shape.layers),
    }
