"""A compiled model's parameters from its declaration table, and its weights: a build's (the dense tensors and
the upcycling recipe, made into this rank's experts at load time) or a run's (final.safetensors)."""
import json
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
            t = _empty(name, shape, getattr(torch, dtype), device)
            if is_buffer:
                owner.register_buffer(leaf, t)
            else:
                owner.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=t.is_floating_point()))
    for name, source in tied.items():
        *path, leaf = name.split(".")
        *spath, sleaf = source.split(".")
        _owner(module, path).register_parameter(leaf, getattr(_owner(module, spath), sleaf))


def _empty(name: str, shape, dtype, device) -> torch.Tensor:
    try:
        return torch.empty(shape, dtype=dtype, device=device)
    except RuntimeError as e:  # the CPU allocator's failure is a plain RuntimeError
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        gib = torch.Size(shape).numel() * dtype.itemsize / 2**30
        raise MoecError(f"the model does not fit in {device} memory: allocating {name} {tuple(shape)} "
                        f"({gib:.1f} GiB) failed") from None


def _owner(module, path):
    for p in path:
        if not hasattr(module, p):
            module.add_module(p, torch.nn.Module())
        module = getattr(module, p)
    return module


WEIGHTS, RECIPE = "weights.safetensors", "upcycle.json"  # in a build dir
REFERENCES = "dense.json"  # in a build compiled with --reference-weights: where its dense tensors are


class BuildTensors:
    """A build's stored tensors by name, read one at a time: its weights.safetensors and, for a build that
    references the dense checkpoint instead of copying it (--reference-weights), that checkpoint's files,
    each checked against the size and SHA-256 the compile recorded before any tensor of it is read."""

    def __init__(self, build):
        from moec.base.safetensors_io import Reader

        build = Path(build)
        self.files = {WEIGHTS: Reader(build / WEIGHTS)}
        self.where = {n: (WEIGHTS, n) for n in self.files[WEIGHTS].keys()}  # name -> (file, its name there)
        if (build / REFERENCES).is_file():
            references = json.loads((build / REFERENCES).read_text())
            for file, record in references["files"].items():
                _check_referenced(build, Path(file), record["bytes"], record["sha256"])
                self.files[file] = Reader(file)
            self.where.update((n, tuple(at)) for n, at in references["tensors"].items())

    def keys(self):
        return self.where.keys()

    def shape(self, name: str) -> tuple:
        file, stored = self.where[name]
        return self.files[file].shape(stored)

    def dtype(self, name: str) -> torch.dtype:
        file, stored = self.where[name]
        return self.files[file].dtype(stored)

    def get(self, name: str) -> torch.Tensor:
        file, stored = self.where[name]
        return self.files[file].get(stored)


def sha256(path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_referenced(build: Path, file: Path, size: int, digest: str) -> None:
    if not file.is_file():
        raise MoecError(f"{build} reads its dense weights from {file}, which does not exist; put the checkpoint "
                        f"back there or compile the build again")
    if file.stat().st_size != size or sha256(file) != digest:
        raise MoecError(f"{build} reads its dense weights from {file}, which has changed since the compile (its "
                        f"SHA-256 differs from the one the build recorded); compile the build again")


def require_weights(build) -> None:
    """That the build has weights; train.py asks before it allocates the model, since a build compiled
    without weights is most often one too large to allocate here."""
    path = Path(build) / WEIGHTS
    if path.is_file():
        return
    why = "`moec compile` writes no weights above --max-weights-gb (default 4)"
    try:  # the build's config.json says how large they would have been
        config = json.loads((path.parent / "config.json").read_text())
        gib, limit = config["result"]["weights_bytes"] / 2**30, config["options"]["max_weights_gb"]
        why = f"the build was compiled without weights: their {gib:,.1f} GiB are over --max-weights-gb {limit:g}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise MoecError(f"{path} does not exist: {why}; compile it again with a larger --max-weights-gb, on a "
                    f"machine with the memory for them")


def load_build(model_cls, build, device="cpu", ep: int = 1, j: int = 0) -> torch.nn.Module:
    """model_cls (the build's model.py's Model) holding the build's weights on device: every tensor but the
    experts as the build stores it, and of each expert tensor only the experts of EP rank j of ep, made from
    its dense source by the build's recipe (moec.runtime.upcycle), one at a time."""
    from moec.runtime.distributed.params import expert_slice, is_expert
    from moec.runtime import upcycle

    build = Path(build)
    require_weights(build)
    written = json.loads((build / RECIPE).read_text())
    recipe, only_sources = written["experts"], set(written["sources"])
    model = model_cls(device="meta")
    f = BuildTensors(build)
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    fake = {n: torch.empty(f.shape(n), device="meta") for n in f.keys() if n not in only_sources}
    check_state(model, fake | {n: own[n] for n in recipe if n in own})
    missing = next((e["source"] for e in recipe.values() if e["source"] not in f.keys()), None)
    if missing is not None:
        raise RuntimeError(f"weights do not match the model: {RECIPE} makes experts from {missing}, which "
                           f"{WEIGHTS} lacks")

    def tensor(name, old):
        if name not in recipe:
            return f.get(name).to(device=device, dtype=old.dtype)
        local = expert_slice(old.shape[0], ep, j) if is_expert(name) else None  # shared experts: whole
        source = f.get(recipe[name]["source"]).to(device)
        return upcycle.make(recipe[name], source, local and range(local.start, local.stop), old.dtype)

    _replace_tensors(model, tensor, lambda name: name in recipe or name in f.keys())
    return model


def _replace_tensors(model: torch.nn.Module, make, stored) -> None:
    """Give every parameter and buffer the tensor make(name, old) returns; tied names share one, made under
    the name stored(name) says the weights hold it by."""
    names, tensors = {}, []
    for path, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for leaf, old in table.items():
                if old is not None:
                    names.setdefault(id(old), []).append(f"{path}.{leaf}" if path else leaf)
                    tensors.append((table, leaf, old, table is module._parameters))
    made = {}
    for table, leaf, old, is_param in tensors:
        if id(old) not in made:
            aliases = names[id(old)]
            t = make(next((n for n in aliases if stored(n)), aliases[0]), old)
            made[id(old)] = torch.nn.Parameter(t, requires_grad=old.requires_grad) if is_param else t
        table[leaf] = made[id(old)]


def load_weights(model: torch.nn.Module, path) -> None:
    """Load a safetensors file holding the whole model: a run's final.safetensors or a training checkpoint
    export."""
    from safetensors.torch import load_file

    load_state(model, load_file(str(path)))


def check_state(model: torch.nn.Module, state: dict) -> None:
    """That state holds every tensor of the model's state dict, in its shape, and nothing else (a tied name
    may be absent: it loads through its source; a non-persistent buffer of the model, such as a rotary table,
    may be present: a build's own weights hold its buffers, and the model computes them itself); a one-line
    RuntimeError if not."""
    own = model.state_dict()
    derived = {n for n, _ in model.named_buffers()} - set(own)
    loaded = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in state}
    missing = [n for n in own if n not in state and id(_get(model, n)) not in loaded]
    unexpected = [n for n in state if n not in own and n not in derived]
    if missing or unexpected:
        def listed(names, what):
            return f"{what} {', '.join(names[:3])}" + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")
        parts = ([listed(missing, "missing (the model has, the weights lack)")] if missing else []) + \
                ([listed(unexpected, "unexpected (the weights hold, the model lacks)")] if unexpected else [])
        raise RuntimeError(f"weights do not match the model: {'; '.join(parts)}")
    wrong = [n for n in own if n in state and state[n].shape != own[n].shape]  # the first in the model's order
    if wrong:
        n = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise RuntimeError(f"weights do not match the model: {n} is {tuple(state[n].shape)}, the model's "
                           f"{tuple(own[n].shape)}{more}")


def load_state(model: torch.nn.Module, state: dict) -> None:
    """load_state_dict that accepts a tied name being absent (it loads through its source)."""
    check_state(model, state)
    model.load_state_dict(state, strict=False)


def _get(module, name):
    *path, leaf = name.split(".")
    return getattr(_owner(module, path), leaf)
