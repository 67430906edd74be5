"""Published MoE models as moec sees them: a dense base config (the fields of
examples/llama.py's LlamaConfig) plus `moec compile` MoE options, with the
parameter counts their authors report. One place for these numbers, so that
formula checks and capture checks read the same ones.
"""
from dataclasses import dataclass

from moec.base.options import Options
from moec.cost_model.shape import ModelShape


@dataclass(frozen=True)
class KnownModel:
    name: str
    example: str  # the examples/ file whose build_model takes `base`
    base: dict  # dense-base config: LlamaConfig fields
    moe: Options
    tied_embeddings: bool
    published_total: float
    published_active: float
    source: str

    def shape(self) -> ModelShape:
        c = self.base
        return ModelShape(layers=c["n_layers"], hidden=c["dim"], ffn=c["ffn_dim"], vocab=c["vocab_size"],
                          heads=c["n_heads"], kv_heads=c["n_kv_heads"], gated=True,
                          tied_embeddings=self.tied_embeddings, seq_len=c["max_seq_len"], name=self.name)


MIXTRAL_8X7B = KnownModel(
    name="Mixtral-8x7B",
    example="examples/llama.py",
    base=dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
              max_seq_len=4096, rope_theta=1e6),  # Mistral-7B
    moe=Options(experts=8, topk=2),
    tied_embeddings=False,
    published_total=46.7e9,
    published_active=12.9e9,
    source="Mixtral of Experts, Jiang et al. 2024 (arXiv:2401.04088): 47B total, 13B active; "
           "46.7B / 12.9B in the Mistral AI release notes",
)

# DeepSeekMoE-16B's experts (1408) are not an integer fraction of its dense
# layer-0 FFN (10944), so the expert width is given explicitly.
DEEPSEEKMOE_16B = KnownModel(
    name="DeepSeekMoE-16B",
    example="examples/llama.py",
    base=dict(vocab_size=102400, dim=2048, n_layers=28, n_heads=16, n_kv_heads=16, ffn_dim=10944,
              max_seq_len=4096, rope_theta=1e4),
    moe=Options(experts=64, topk=6, shared_experts=2, first_dense=1, expert_ffn=1408),
    tied_embeddings=False,
    published_total=16.4e9,
    published_active=2.8e9,
    source="DeepSeekMoE, Dai et al. 2024 (arXiv:2401.06066), Table: 16.4B total, 2.8B activated",
)

KNOWN_MODELS = {m.name: m for m in (MIXTRAL_8X7B, DEEPSEEKMOE_16B)}
