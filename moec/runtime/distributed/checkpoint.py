"""Checkpoints with torch.distributed.checkpoint that resume at another EP size.

Each expert parameter (and its optimizer state) is saved as a DTensor over the
(dp, ep) mesh, sharded on dim 0 along ep and replicated along dp, so the
checkpoint holds every expert once under its global shape. Loading builds the
same state for the current mesh and lets DCP read each rank's slice: a run
saved at EP=2 resumes at EP=4, or on one process (plain, full tensors).
Replicated tensors are plain tensors; DCP writes them once.
"""
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Replicate, Shard

from moec.base.errors import MoecError
from moec.runtime.distributed.params import is_expert


def _wrap(name: str, t: torch.Tensor, mesh):
    if mesh is None or not is_expert(name) or t.dim() == 0:
        return t
    return DTensor.from_local(t, mesh, [Replicate(), Shard(0)], run_check=False)


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


def _state(model, optimizer, mesh) -> dict:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise MoecError(f"checkpoint: {type(optimizer).__name__} is not a torch.optim.Optimizer; its state "
                        "cannot be saved by parameter name")
    names = {p: n for n, p in model.named_parameters()}
    state = {f"model.{n}": _wrap(n, p.detach(), mesh) for n, p in model.named_parameters()}
    if optimizer is not None:
        for p, s in optimizer.state.items():
            for k, v in s.items():
                state[f"optim.{names[p]}.{k}"] = _wrap(names[p], v, mesh) if torch.is_tensor(v) else v
    return state


def save(path, model: torch.nn.Module, optimizer=None, mesh=None) -> None:
    dcp.save(_state(model, optimizer, mesh), checkpoint_id=str(path), no_dist=not dist.is_initialized())


def load(path, model: torch.nn.Module, optimizer=None, mesh=None) -> None:
    """Fill model (holding this rank's experts) and optimizer from a checkpoint written at any EP."""
    if optimizer is not None and not optimizer.state:
        _init_optimizer_state(optimizer)
    # the state's tensors alias the parameters and optimizer tensors (DTensor.from_local keeps
    # the local tensor), so DCP's in-place load fills them
    dcp.load(_state(model, optimizer, mesh), checkpoint_id=str(path), no_dist=not dist.is_initialized())
