"""Checkpoints with torch.distributed.checkpoint that resume at another EP size.

Each expert parameter (and its optimizer state) is saved as a DTensor over the
(dp, ep) mesh, sharded on dim 0 along ep and replicated along dp, so the
checkpoint holds every expert once under its global shape. Loading builds the
same state for the current mesh and lets DCP read each rank's slice: a run
saved at EP=2 resumes at EP=4, or on one process (plain, full tensors). The
slices of tensor parallelism are saved the same way, over the (dp, ep, tp)
mesh, sharded along tp.
Replicated tensors are plain tensors; DCP writes them once.

Loading never runs code a checkpoint carries: DCP unpickles .metadata with
pickle.load and its non-tensor items with torch.load(weights_only=False), so
every load here goes through load_state, whose reader admits only the classes
DCP's Metadata is made of and whose planner reads non-tensor items with
weights_only=True. A checkpoint holding anything else fails to load with
pickle.UnpicklingError.
"""
import io
import pickle

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.tensor import DTensor, Replicate, Shard

from moec.base.errors import MoecError
from moec.runtime.distributed.params import is_expert

# What DCP pickles into .metadata (torch 2.11 to 2.13): its dataclasses, torch.Size,
# dtypes and layouts, and the checkpoint's path in StorageMeta (pathlib._local from Python 3.13)
_PATHS = {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}
METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"} | {name for name, v in vars(torch).items() if isinstance(v, torch.dtype)},
    "torch.serialization": {"_get_layout"},  # looks a layout up by name
    "pathlib": _PATHS, "pathlib._local": _PATHS,
    "builtins": {"set", "frozenset"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name not in METADATA_GLOBALS.get(module, ()):
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """FileSystemReader whose read_metadata unpickles only METADATA_GLOBALS."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")  # DCP's fallback to per-rank metadata
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        with open(self.fs.concat_path(self.path, name), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"checkpoint metadata is a {type(metadata).__name__}, not a DCP Metadata")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        # the parent reads with torch.load(weights_only=False): hand it a copy of what weights_only admitted
        safe = io.BytesIO()
        torch.save(torch.load(value, weights_only=True), safe)
        safe.seek(0)
        super().load_bytes(read_item, safe)


def read_metadata(path) -> Metadata:
    return SafeReader(path).read_metadata()


def load_state(state: dict, path) -> None:
    """dcp.load without unpickling anything but tensors and plain data."""
    dcp.load(state, storage_reader=SafeReader(path), planner=_SafePlanner(), no_dist=not dist.is_initialized())


def read_model(path) -> dict:
    """Every model tensor of a checkpoint of either layout, by name, at its global shape on the CPU, read by
    one process whatever EP or plan wrote it."""
    saved = read_metadata(path).state_dict_metadata
    state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for key, meta in saved.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    load_state(state, path)
    fused = {key[len(FUSED) + 1:] for key in saved if key.startswith(FUSED + ".")}  # DCP flattens the dict
    return {key[len("model."):]: t.flatten(0, 1) if key[len("model."):] in fused else t for key, t in state.items()}


FUSED = "tp_fused"  # {name: parts} of the fused weights a tensor-parallel build saves viewed [parts, ...]


def mismatch(state: dict, metadata: Metadata) -> str | None:
    """What keeps a checkpoint with this metadata from filling state (a key it lacks, a shape it has
    otherwise), or None."""
    saved = metadata.state_dict_metadata
    for key, value in state.items():
        if isinstance(value, dict):  # DCP saves a dict (FUSED's) as its items, "key.name"
            if problem := mismatch({f"{key}.{k}": v for k, v in value.items()}, metadata):
                return problem
            continue
        if key not in saved:
            return f"it has no {key}"
        if torch.is_tensor(value) and (size := getattr(saved[key], "size", None)) != value.shape:
            return f"{key} is {'not a tensor' if size is None else list(size)} in it, {list(value.shape)} here"
    return None


def _wrap(name: str, t: torch.Tensor, mesh, split: dict):
    """t as saved: an expert's over (dp, ep[, tp]), sharded on dim 0 along ep; a tensor-parallel slice
    (split: {name: (dim, parts)}) over (dp, ep, tp), sharded along tp on dim, a fused weight of P parts
    viewed [P, out/P, ...] so that each rank's slice is a block of it (also on one process)."""
    tp = mesh is not None and "tp" in mesh.mesh_dim_names
    if name in split and t.dim():
        dim, parts = split[name]
        if parts > 1:
            t, dim = t.view(parts, -1, *t.shape[1:]), dim + 1
        return DTensor.from_local(t, mesh, [Replicate(), Replicate(), Shard(dim)], run_check=False) if tp else t
    if mesh is None or not is_expert(name) or t.dim() == 0:
        return t
    return DTensor.from_local(t, mesh, [Replicate(), Shard(0)] + [Replicate()] * tp, run_check=False)


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the lazily made state (a step with zero gradients and lr 0), so loading has tensors to fill."""
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def named_state(model, optimizer, mesh, split: dict | None = None) -> dict:
    """The state this layout saves, keyed "model.NAME" and "optim.NAME.KEY"; optimizer None: the model's."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise MoecError(f"checkpoint: {type(optimizer).__name__} is not a torch.optim.Optimizer; its state "
                        "cannot be saved by parameter name")
    names, split = {p: n for n, p in model.named_parameters()}, split or {}
    state = {f"model.{n}": _wrap(n, p.detach(), mesh, split) for n, p in model.named_parameters()}
    state.update({f"model.{n}": b for n, b in model.named_buffers()})  # replicated (router biases, rotary tables)
    fused = {n: parts for n, (_, parts) in split.items() if parts > 1}
    if fused:  # read_model gives these back at the model's shapes
        state[FUSED] = fused
    if optimizer is not None:
        for p, s in optimizer.state.items():
            for k, v in s.items():
                state[f"optim.{names[p]}.{k}"] = _wrap(names[p], v, mesh, split) if torch.is_tensor(v) else v
    return state


def save(path, model: torch.nn.Module, optimizer=None, mesh=None, split: dict | None = None) -> None:
    dcp.save(named_state(model, optimizer, mesh, split), checkpoint_id=str(path), no_dist=not dist.is_initialized())


def load(path, model: torch.nn.Module, optimizer=None, mesh=None, split: dict | None = None) -> None:
    """Fill model (holding this rank's experts and TP slices) and optimizer from a checkpoint written at any
    EP and TP."""
    if optimizer is not None and not optimizer.state:
        _init_optimizer_state(optimizer)
    # the state's tensors alias the parameters and optimizer tensors (DTensor.from_local keeps
    # the local tensor), so DCP's in-place load fills them
    load_state(named_state(model, optimizer, mesh, split), path)
