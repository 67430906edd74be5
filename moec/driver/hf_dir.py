"""A Hugging Face checkpoint directory as the model to compile: its config.json gives the architecture,
which transformers builds (from the config, on the meta device first, like any model file's factory), and
its safetensors (one file, or shards with their index) give the weights.

Only the configuration is read: a config.json that asks for code of its own (auto_map) is refused, since
building it would run that code.
"""
import types
from pathlib import Path

import torch

from moec.base.errors import MoecError

CONFIG = "config.json"


def is_hf_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def load_hf_dir(path: str) -> types.ModuleType:
    """A stand-in for an imported model file: build_model(**overrides) builds the directory's architecture
    with the config's fields overridden (--set); weights are not loaded (see dense_weights)."""
    directory = Path(path).resolve()
    hf_config = _config(directory)
    mod = types.ModuleType(f"moec_hf_{directory.name.replace('-', '_')}")
    mod.__file__ = str(directory / CONFIG)

    def build_model(config=None, **overrides):
        if config is not None:
            raise MoecError(f"--config picks a configuration of a model file; {path} has one, its {CONFIG}: "
                            f"drop --config (--set KEY=VALUE changes a field)")
        cfg = hf_config.__class__.from_dict(hf_config.to_dict())
        for key, value in overrides.items():
            if not hasattr(cfg, key):
                raise MoecError(f"--set {key}: {path}/{CONFIG} ({cfg.model_type}) has no field {key!r}")
            setattr(cfg, key, value)
        return _build(cfg)

    mod.build_model = build_model
    return mod


def _config(directory: Path):
    try:
        import transformers
    except ImportError:
        raise MoecError(f"{directory} is a Hugging Face checkpoint: install transformers "
                        f"(pip install -e \".[hf]\")") from None
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(directory), trust_remote_code=False,
                                                      local_files_only=True)
    except Exception as e:  # unknown model_type, custom code, a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MoecError(f"{directory / CONFIG}: transformers {transformers.__version__} cannot build it: "
                        f"{first}") from None
    if getattr(cfg, "auto_map", None):
        raise MoecError(f"{directory / CONFIG}: its model needs code of its own (auto_map), which moec does not "
                        f"run; give a model file that builds it")
    return cfg


def _build(cfg) -> torch.nn.Module:
    """The causal LM of this config in float32 (training keeps fp32 weights whatever the checkpoint's dtype),
    with SDPA attention where the family has it."""
    import transformers

    for attention in ("sdpa", "eager"):
        try:
            return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attention,
                                                                 dtype=torch.float32)
        except ValueError as e:
            if attention == "eager" or "attn" not in str(e).lower() and "sdpa" not in str(e).lower():
                first = str(e).strip().splitlines()[0]
                raise MoecError(f"transformers cannot build a causal LM from this {CONFIG}: {first}") from None
