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


def save_tiny(family: str, directory: Path, seed: int = 0) -> Path:
    """A random tiny model of the family (examples/hf_models.py's config) saved in shards of 200 KB."""
    import transformers

    cls, kwargs = FAMILIES[family]
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
