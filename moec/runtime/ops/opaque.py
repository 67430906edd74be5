"""Calls the graph keeps opaque: a model's operator without a fake kernel, or a
function its file marks with torch.fx.wrap (data-dependent code, an extension).

The graph calls `opaque_call(name, rule, *args)`. On real tensors it calls the
named callable; on fake or meta tensors (capture, shape propagation, the
training program's FLOP count) it returns empty tensors shaped by `rule`, which
capture worked out by running the call once on zeros.
"""
import importlib

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import is_fake


def qualified_name(target) -> str:
    """'torch.ops.ns.op.overload' for an operator, 'module:qualname' for a function."""
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target}"
    return f"{target.__module__}:{target.__qualname__}"


def resolve(name: str):
    """Looked up on every call, not cached: a model file loaded again in the same process defines its
    operators again, and torch frees the old ones."""
    if name.startswith("torch.ops."):
        obj = torch.ops
        for part in name.removeprefix("torch.ops.").split("."):
            obj = getattr(obj, part)
        return obj
    module, qualname = name.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def opaque_call(name: str, rule: tuple, *args, **kwargs):
    """rule: (one output or a tuple, per output (argument index, sizes with None where the argument's
    size at that position is taken, dtype name))."""
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not any(is_fake(t) or t.is_meta for t in tensors):
        return resolve(name)(*args, **kwargs)
    single, outputs = rule
    out = tuple(torch.empty([args[i].shape[d] if s is None else s for d, s in enumerate(sizes)],
                            dtype=getattr(torch, dtype), device=tensors[0].device)
                for i, sizes, dtype in outputs)
    return out[0] if single else out
