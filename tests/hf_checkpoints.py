"""Tiny Hugging Face checkpoints as `save_pretrained` writes them (config.json, several safetensors shards
and their index), and the emitted model.py of a build loaded with given weights: shared by the tests of
checkpoints in and out."""
import sys
from pathlib import Path

import torch

import moec.runtime
from moec.runtime.kernels.generated import import_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
from hf_models import FAMILIES  # noqa: E402


# a dense DeepSeek-V3 (every layer's MLP dense: first_k_dense_replace = its depth), which moec upcycles and
# exports to deepseek_v3 (multi-head latent attention, which no other format has)
DENSE_DEEPSEEK_V3 = ("DeepseekV3Config", dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, first_k_dense_replace=2, max_position_embeddings=256))


def save_tiny(family: str, directory: Path, seed: int = 0) -> Path:
    """A random tiny model of the family (examples/hf_models.py's config, or the dense DeepSeek-V3 above)
    saved in shards of 200 KB."""
    import transformers

    cls, kwargs = DENSE_DEEPSEEK_V3 if family == "deepseek_v3" else FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, cls)(**{k: v for k, v in kwargs.items() if v is not None})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory, max_shard_size="200KB")
    return directory


def load_program(build: Path, weights: Path | None = None) -> torch.nn.Module:
    """The build's model.py holding weights (default: the build's own, its experts upcycled), in eval mode."""
    mod = import_file(f"built_{build.name}_{id(weights)}", build / "model.py")
    if weights is None:
        return moec.runtime.load_build(mod.Model, build).eval()
    model = mod.Model()
    moec.runtime.load_weights(model, weights)
    return model.eval()


def hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits
