"""bf16 copies of the expert weights, made once per optimizer step rather than once per micro-batch.

Under autocast the expert GEMMs take bf16 weights. Casting the fp32 weights at every call reads every expert
weight and writes half of it again, each micro-batch (on the training-speed bench of BENCHMARKS.md these casts
and their gradients' casts back took 4.3 ms of a 102 ms step). With `keep_until_step(optimizer)` the first
micro-batch's copy of a weight is kept and reused until the optimizer next steps. The copy's autograd node, a
dtype cast, saves no tensors, so each micro-batch's backward passes through it into the fp32 weight's .grad as a
fresh cast would.

Copies are kept only for parameters that require grad, only with gradients on (a copy made
without them would carry no gradient back), and never while torch.compile traces (the compiled graph casts
on its own). A build whose parameters FSDP shards does not keep them: the copy would hold an unsharded
weight between micro-batches.
"""
import torch
from torch.utils.weak import WeakIdKeyDictionary

_copies = WeakIdKeyDictionary()  # fp32 parameter -> its bf16 copy
_keeping = False


def clear(*_) -> None:
    """Drop the copies; the optimizer's step-post hook (the weights have changed)."""
    _copies.clear()


def keep_until_step(optimizer: torch.optim.Optimizer) -> None:
    """Keep copies from now on, dropped after each of the optimizer's steps."""
    global _keeping
    _keeping = True
    optimizer.register_step_post_hook(clear)


def cast(t, dtype: torch.dtype):
    """t in dtype, the kept copy where there is one (floating tensors only; anything else as it is)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype:
        return t
    # a traced call (torch.compile, fake tensors) sees stand-ins for the parameters, never Parameters
    keep = _keeping and type(t) is torch.nn.Parameter and t.requires_grad and torch.is_grad_enabled() \
        and not torch.compiler.is_compiling()
    if not keep:
        return t.to(dtype)
    copy = _copies.get(t)
    if copy is None or copy.dtype != dtype:
        copy = _copies[t] = t.to(dtype)
    return copy


def register_autocast(qualname: str, device_type: str, dtype: torch.dtype) -> None:
    """As torch.library.register_autocast, casting the op's floating inputs through `cast`."""
    op = torch._library.utils.lookup_op(qualname)
    name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, name)

    def run(*args):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*(cast(a, dtype) for a in args))

    # the Python dispatcher (tracing, fake tensors) looks for a Python kernel; eager calls the library's
    if op.has_kernel_for_dispatch_key(key):
        op.py_kernels.pop(key, None)
    op.py_impl(key)(run)
    lib = torch.library.Library(torch._library.utils.parse_namespace(qualname)[0], "FRAGMENT")
    lib.impl(op._opname, lambda _, *args: run(*args), name, with_keyset=True)
    _libraries.append(lib)  # a registration lasts as long as its Library object


_libraries = []
