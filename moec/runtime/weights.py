"""A compiled model's parameters from its declaration table, and its weights."""
from pathlib import Path

import torch

from moec.base.errors import MoecError


def declare(module: torch.nn.Module, params: dict, buffers: dict, tied: dict, device="cpu") -> None:
    """Create the parameters and buffers {name: (shape, dtype)} at their dotted
    paths (uninitialised), and make each tied name share its source parameter."""
    for table, is_buffer in ((params, False), (buffers, True)):
        for name, (shape, dtype) in table.items():
            *path, leaf = name.split(".")
            owner = _owner(module, path)
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            if is_buffer:
                owner.register_buffer(leaf, t)
            else:
                owner.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=t.is_floating_point()))
    for name, source in tied.items():
        *path, leaf = name.split(".")
        *spath, sleaf = source.split(".")
        _owner(module, path).register_parameter(leaf, getattr(_owner(module, spath), sleaf))


def _owner(module, path):
    for p in path:
        if not hasattr(module, p):
            module.add_module(p, torch.nn.Module())
        module = getattr(module, p)
    return module


def load_weights(model: torch.nn.Module, path) -> None:
    """Load a safetensors file written by `moec compile` or a training checkpoint export."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise MoecError(f"{path} does not exist: `moec compile` writes no weights above --max-weights-gb "
                        f"(default 4); compile again with a larger --max-weights-gb")
    load_state(model, load_file(str(path)))


def load_state(model: torch.nn.Module, state: dict) -> None:
    """load_state_dict that accepts a tied name being absent (it loads through its source)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in state}
    missing = [n for n in missing if id(_get(model, n)) not in loaded]
    if missing or unexpected:
        raise RuntimeError(f"weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
                           f"{' ...' if len(missing) > 3 or len(unexpected) > 3 else ''}")


def _get(module, name):
    *path, leaf = name.split(".")
    return getattr(_owner(module, path), leaf)
