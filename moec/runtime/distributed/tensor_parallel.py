"""Tensor parallelism (Megatron's column/row split) on the "tp" group: the two collectives the compiled
graph calls around the linears it splits, and keeping this rank's slice of their weights.

A column-parallel linear [out, in] keeps rows: its output features are split over the TP ranks (with
parts P, a fused projection such as q/k/v, each of the P parts is split, so a rank holds its share of
every part, in order). A row-parallel linear keeps columns: it reads the features the column-parallel
ones left on this rank, and the ranks' partial outputs are summed. Between them each rank runs its own
heads (attention) or hidden units (FFN); outside them every TP rank holds the same activations.

  enter(x)   identity; its backward sums x's gradient over "tp" (each rank saw x only through its slice)
  reduce(y)  the sum of y over "tp"; its backward is the identity (every rank's output is the same)

With no "tp" group registered (one process) both return their input: the graph runs as compiled.
"""
import torch
import torch.distributed as dist

from moec.runtime.distributed import groups


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=groups.get("tp"))
        return grad


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        y = y.contiguous().clone()
        dist.all_reduce(y, group=groups.get("tp"))
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad


def enter(x: torch.Tensor) -> torch.Tensor:
    """x as the input of column-parallel linears (see the module docstring)."""
    return x if groups.get("tp") is None else _Enter.apply(x)


def reduce(y: torch.Tensor) -> torch.Tensor:
    """The row-parallel linear's output, summed over the TP ranks (see the module docstring)."""
    return y if groups.get("tp") is None else _Reduce.apply(y)


def local_slice(t: torch.Tensor, style: str, parts: int, tp: int, rank: int, bias: bool = False) -> torch.Tensor:
    """This TP rank's slice of a weight (or its bias) that the plan splits `style`-wise."""
    if style == "rowwise":
        return t.clone() if bias else t.chunk(tp, dim=1)[rank].clone()
    whole = t.reshape(parts, t.shape[0] // parts, *t.shape[1:])  # [P, out/P, ...]
    return whole.chunk(tp, dim=1)[rank].reshape(-1, *t.shape[1:]).clone()


def shard_linears(model: torch.nn.Module, plan: dict, tp: int, rank: int) -> list[str]:
    """Replace each weight the plan splits (and a column-parallel linear's bias) by this rank's slice;
    the names replaced. plan: config.json's tp_plan, {weight: {"style", "bias", "parts"}}."""
    params = dict(model.named_parameters())
    names = []
    for weight, how in plan.items():
        for name, is_bias in ((weight, False), (how["bias"], True)):
            if name is None or (is_bias and how["style"] == "rowwise"):
                continue
            *path, leaf = name.split(".")
            p = params[name]
            local = local_slice(p.detach(), how["style"], how["parts"], tp, rank, is_bias)
            model.get_submodule(".".join(path)).register_parameter(
                leaf, torch.nn.Parameter(local, requires_grad=p.requires_grad))
            names.append(name)
    return names


def tp_layout(plan: dict) -> dict:
    """{parameter: (dim it is split on, parts)} of a tp_plan: what checkpoints save at global shape."""
    out = {}
    for weight, how in plan.items():
        out[weight] = (0 if how["style"] == "colwise" else 1, how["parts"])
        if how["bias"] is not None and how["style"] == "colwise":
            out[how["bias"]] = (0, how["parts"])
    return out
