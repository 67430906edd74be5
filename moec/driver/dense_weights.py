"""The dense weights `moec compile` upcycles, opened without reading them: a safetensors file, a torch
state dict (loaded with weights_only, memory-mapped), a Hugging Face checkpoint directory (one
model.safetensors, or shards listed by model.safetensors.index.json), or such an index itself.

Names and shapes come from the files' headers, so a mismatch with the model is found before anything is
read or the model is captured; `Streamed` then gives a graph captured on the meta device each tensor when
asked, read alone from its shard (`load_into` copies them into a model built for real, one at a time),
so no dense state dict is ever held.
"""
import json
import math
import pickle
import re
from pathlib import Path

import torch

from moec.base.errors import MoecError
from moec.base.safetensors_io import BY_NAME
from moec.runtime.weights import check_state

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FORMATS = ("give a .safetensors file or a torch.save'd state dict of tensors (a checkpoint holding one under "
           "'model' will do), or a Hugging Face checkpoint directory or its model.safetensors.index.json")


class DenseWeights:
    """Tensors by name, in one or more files, read only when loaded into a model."""

    def __init__(self, label: str, shards: dict[str, list[str]], shapes: dict[str, tuple], state: dict | None,
                 dtypes: dict[str, torch.dtype]):
        self.label = label  # how errors name the weights: "--weights PATH" or the checkpoint directory
        self.shards = shards  # safetensors file -> the names it holds
        self.shapes = shapes
        self.dtypes = dtypes  # what each tensor is stored as, which a build stores it as too
        self.state = state  # a torch state dict's tensors (memory-mapped), instead of shards
        self._readers = {}  # shard -> its header, read once
        self._file_of = {n: file for file, held in shards.items() for n in held}

    def check(self, model: torch.nn.Module) -> dict:
        """That these weights are exactly the model's tensors at their shapes: a one-line MoecError naming
        the first name the model lacks, or one it has that the weights lack; {weights' name: model's name}."""
        names = _model_names(model, self.shapes)
        fake = {names[n]: torch.empty(s, device="meta") for n, s in self.shapes.items() if n in names}
        try:
            check_state(model, fake)
        except RuntimeError as e:
            raise MoecError(f"{self.label}: {e}") from None
        return names

    def dtypes_in(self, model: torch.nn.Module, prefix: str = "") -> dict:
        """{prefix + the model's name for a tensor: the floating dtype these weights hold it in}."""
        return {prefix + own: self.dtypes[name] for name, own in self.check(model).items()
                if name in self.dtypes and self.dtypes[name].is_floating_point}

    def nbytes(self) -> int:
        return sum(math.prod(s) * self.dtypes[n].itemsize for n, s in self.shapes.items() if n in self.dtypes)

    def read(self, name: str) -> torch.Tensor:
        """One tensor, as stored (its dtype), read from its shard alone."""
        if self.state is not None:
            return self.state[name]
        from moec.base.safetensors_io import Reader
        file = self._file_of[name]
        if file not in self._readers:
            self._readers[file] = Reader(file)
        return self._readers[file].get(name)

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy every tensor into the model's tensor of that name, shard by shard."""
        names = self.check(model)
        own = model.state_dict(keep_vars=True)
        with torch.no_grad():
            if self.state is not None:
                for name, t in self.state.items():
                    if names.get(name) in own:  # not a buffer the model computes itself
                        own[names[name]].copy_(t)
                return
            from moec.base.safetensors_io import Reader
            for file, held in self.shards.items():
                f = Reader(file)
                for name in held:
                    if names.get(name) in own:
                        own[names[name]].copy_(f.get(name))


class Streamed:
    """The tensors of a graph captured on the meta device, by the graph's names, as the weights hold them
    (read when asked, one at a time) or, for buffers the model computes itself (rotary tables), as a build
    of the model with its parameters on the meta device made them."""

    def __init__(self, weights: DenseWeights, model: torch.nn.Module, shell: torch.nn.Module, prefix: str = ""):
        """model: the module the weights' names are of (on meta); shell: the graph's module, parameters on
        meta, buffers real; prefix: what the graph's names add to model's."""
        self.weights = weights
        self.source = {prefix + own: name for name, own in weights.check(model).items()}
        tied: dict[int, list[str]] = {}
        for n, t in model.state_dict(keep_vars=True).items():
            tied.setdefault(id(t), []).append(prefix + n)
        for same in tied.values():  # a tied name the weights lack reads its twin's tensor
            held = next((n for n in same if n in self.source), None)
            for n in same if held is not None else ():
                self.source.setdefault(n, self.source[held])
        self.buffers = {n: b for n, b in shell.named_buffers() if not b.is_meta}
        self.dtypes = {n: t.dtype for n, t in shell.state_dict(keep_vars=True).items()}

    def where(self, name: str) -> tuple[str, str]:
        """(the absolute path of the safetensors file that holds name's tensor, its name there)."""
        held = self.source[name]
        return str(Path(self.weights._file_of[held]).resolve()), held

    def stored(self, name: str) -> torch.Tensor:
        """name's tensor in the dtype the weights hold it in."""
        if name in self.source:
            return self.weights.read(self.source[name])
        if name in self.buffers:
            return self.buffers[name]
        raise MoecError(f"{self.weights.label}: the model's {name} is neither in the weights nor computed by "
                        f"the model; give weights that hold it")

    def value(self, name: str) -> torch.Tensor:
        """name's tensor in the model's dtype, as the model loaded from the weights holds it."""
        t = self.stored(name)
        return t.to(self.dtypes.get(name, t.dtype))


def _model_names(model: torch.nn.Module, names) -> dict:
    """{name in the weights: the model's name for it}: the same name, or for a transformers model, the name
    with its base model's prefix added or taken off, as from_pretrained reads a base model's checkpoint into a
    causal LM (the Hub's GPT-2 names h.0.attn.c_attn.weight what GPT2LMHeadModel calls
    transformer.h.0.attn.c_attn.weight). Names the model says to ignore on load (a causal mask GPT-2
    checkpoints hold) are left out."""
    own = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    mapped = {}
    for name in names:
        target = name
        if name not in own and prefix:
            if f"{prefix}.{name}" in own:
                target = f"{prefix}.{name}"
            elif name.startswith(f"{prefix}.") and name[len(prefix) + 1:] in own:
                target = name[len(prefix) + 1:]
        if target in own or not any(p.search(name) for p in ignored):
            mapped[name] = target
    return mapped


def open_weights(path: str, label: str | None = None) -> DenseWeights:
    """The weights at path, their names and shapes read; label: how errors name them (default --weights)."""
    label = label or f"--weights {path}"
    p = Path(path)
    if not p.exists():
        raise MoecError(f"{label}: no such file")
    if p.is_dir():
        if (p / INDEX).is_file():
            return _sharded(p / INDEX, label)
        if (p / SINGLE).is_file():
            return _safetensors({str(p / SINGLE): None}, label)
        raise MoecError(f"{label}: a directory without {SINGLE} or {INDEX}; {FORMATS}")
    if not p.is_file():
        raise MoecError(f"{label}: is not a file")
    if p.name.endswith(".index.json"):
        return _sharded(p, label)
    with open(p, "rb") as f:
        head = f.read(9)
    if p.suffix == ".safetensors" or head[8:9] == b"{":  # an 8-byte header length, then JSON
        return _safetensors({str(p): None}, label)
    return _torch_state(p, head, label)


def _sharded(index: Path, label: str) -> DenseWeights:
    """The shards a Hugging Face index lists (its weight_map: name -> file beside it)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError("weight_map is not a map from names to files")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MoecError(f"{label}: {index.name} is not a safetensors index ({type(e).__name__}: {e}); "
                        f"{FORMATS}") from None
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        if Path(file).name != file:  # shards sit beside their index: a path elsewhere is not read
            raise MoecError(f"{label}: {index.name} puts {name} in {file!r}, not a file beside it")
        files.setdefault(str(index.parent / file), []).append(name)
    for file, names in files.items():
        if not Path(file).is_file():
            raise MoecError(f"{label}: shard {Path(file).name} that {index.name} lists (for {names[0]}"
                            f"{f' and {len(names) - 1} more' if len(names) > 1 else ''}) does not exist")
    return _safetensors(files, label)


def _safetensors(files: dict[str, list[str] | None], label: str) -> DenseWeights:
    """files: each file and the names the index says it holds (None: whatever it holds)."""
    from safetensors import safe_open

    shards, shapes, dtypes = {}, {}, {}
    for file, listed in files.items():
        try:
            with safe_open(file, framework="pt") as f:
                held = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
                dtypes.update((n, BY_NAME.get(f.get_slice(n).get_dtype())) for n in f.keys())
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            what = "it" if listed is None else f"shard {Path(file).name}"
            raise MoecError(f"{label}: cannot read {what} ({type(e).__name__}: {first}); {FORMATS}") from None
        names = list(held) if listed is None else listed
        absent = next((n for n in names if n not in held), None)
        if absent is not None:
            raise MoecError(f"{label}: the index puts {absent} in {Path(file).name}, which does not hold it")
        shards[file] = names
        shapes.update((n, held[n]) for n in names)
    return DenseWeights(label, shards, shapes, None, {n: d for n, d in dtypes.items() if d is not None})


def _torch_state(path: Path, head: bytes, label: str) -> DenseWeights:
    """A torch.save'd state dict, unpickled with weights_only (its tensors memory-mapped when it is a zip)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK"))
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            found = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
            why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            what = (f"it pickles {found.group(1)}, which only an unsafe load would run" if found else
                    f"torch.load(weights_only=True) refuses it ({why.group(1).strip() if why else 'unpickling'})")
            raise MoecError(f"{label}: not a safe weights file: {what}; {FORMATS}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MoecError(f"{label}: cannot read it ({type(e).__name__}: {first}); {FORMATS}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise MoecError(f"{label}: holds a {type(state).__name__}, not a state dict; {FORMATS}")
    odd = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise MoecError(f"{label}: {odd!r} is not a tensor but {type(state[odd]).__name__}; {FORMATS}")
    return DenseWeights(label, {}, {n: tuple(t.shape) for n, t in state.items()}, state,
                        {n: t.dtype for n, t in state.items()})
