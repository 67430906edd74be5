"""Tensor parallelism (Megatron's column/row split) on the "tp" group: the two collectives the compiled
graph calls around the linears it splits, and keeping this rank's slice of their weights.

A column-parallel linear [out, in] keeps rows: its output features are split over the TP ranks (with
parts P, a fused projection such as q/k/v, each of the P parts is split, so a rank holds its share of
every part, in order). A row-parallel linear keeps columns: it reads the features the column-parallel
ones left on this rank, and the ranks' partial outputs are summed. Between them each rank runs its own
heads (attention) or hidden units (FFN); outside them every TP rank holds the same activations.

  enter(x)   identity; its backward sums x's gradient over "tp" (each rank saw x only through its slice)
  reduce(y)  the sum of y over "tp"; its backward is the identity (every rank's output is the same)

Sequence parallelism (Megatron's --sequence-parallel): outside those regions each rank of a TP group holds
only its 1/TP share of the tokens (dim `dim` of the activation, the sequence), so the norms, residual adds,
router and MoE layer run on T/TP tokens:

  enter_sp(x, dim)   all-gather of x's tokens over "tp"; its backward reduce-scatters the gradient
  reduce_sp(y, dim)  the sum of y over "tp", scattered by tokens; its backward all-gathers the gradient
  scatter(x, dim)    this rank's share of x's tokens (every rank holds all of x); backward all-gathers
  gather(x, dim)     all-gather of x's tokens; backward keeps this rank's share of the gradient
  tp_mean(x)         a loss of this rank's tokens averaged over "tp" (every rank gets the TP group's); the
                     gradient is divided by TP, as each rank's share of the group's mean
  tp_sum(c)          expert counts of this rank's tokens summed over "tp", scaled to this rank's total

With no "tp" group registered (one process) every one of them returns its input: the graph runs as compiled.
"""
import torch
import torch.distributed as dist

from moec.base.errors import MoecError
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


def _tokens(n: int, tp: int) -> None:
    if n % tp:
        raise MoecError(f"sequence parallelism splits the {n} tokens of each sequence over TP={tp} ranks, which must "
                        f"divide them: use a --seq-len that TP divides, or a build without --sequence-parallel")


def _on_tokens(x: torch.Tensor, dim: int, collective, rows: int) -> torch.Tensor:
    """collective(out, x) over "tp" with x's tokens (dim `dim`) moved first, out holding `rows` of them."""
    part = x.movedim(dim, 0).contiguous()
    out = part.new_empty((rows, *part.shape[1:]))
    collective(out, part, group=groups.get("tp"))
    return out.movedim(0, dim).contiguous()


def _all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    return _on_tokens(x, dim, dist.all_gather_into_tensor, groups.size("tp") * x.shape[dim])


def _reduce_scatter(y: torch.Tensor, dim: int) -> torch.Tensor:
    tp = groups.size("tp")
    _tokens(y.shape[dim], tp)
    return _on_tokens(y, dim, dist.reduce_scatter_tensor, y.shape[dim] // tp)


def _share(x: torch.Tensor, dim: int) -> torch.Tensor:
    g = groups.get("tp")
    tp = dist.get_world_size(g)
    _tokens(x.shape[dim], tp)
    return x.chunk(tp, dim)[dist.get_rank(g)].contiguous()


def _pair(forward, backward, name: str):
    """An autograd function of (x, dim) that runs forward(x, dim), and backward(grad, dim) for its gradient:
    each collective below has its adjoint as its backward."""
    def fwd(ctx, x, dim):
        ctx.dim = dim
        return forward(x, dim)

    def bwd(ctx, grad):
        return backward(grad, ctx.dim), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


_EnterSP = _pair(_all_gather, _reduce_scatter, "_EnterSP")
_ReduceSP = _pair(_reduce_scatter, _all_gather, "_ReduceSP")
_Scatter = _pair(_share, _all_gather, "_Scatter")
_Gather = _pair(_all_gather, _share, "_Gather")


class _Mean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        g = groups.get("tp")
        ctx.tp = dist.get_world_size(g)
        x = x.detach().clone()
        dist.all_reduce(x, group=g)
        return x / ctx.tp

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.tp


def enter_sp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x's tokens of every TP rank, as the input of column-parallel linears (sequence parallelism)."""
    return x if groups.get("tp") is None else _EnterSP.apply(x, dim)


def reduce_sp(y: torch.Tensor, dim: int) -> torch.Tensor:
    """The row-parallel linear's output summed over the TP ranks, this rank's share of its tokens."""
    return y if groups.get("tp") is None else _ReduceSP.apply(y, dim)


def scatter(x: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's share of the tokens of x, which every rank of the TP group holds whole."""
    return x if groups.get("tp") is None else _Scatter.apply(x, dim)


def gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The tokens of every TP rank: x whole again."""
    return x if groups.get("tp") is None else _Gather.apply(x, dim)


def tp_mean(x: torch.Tensor) -> torch.Tensor:
    """A loss of this rank's tokens, averaged over the TP group."""
    return x if groups.get("tp") is None else _Mean.apply(x)


def tp_sum(counts: torch.Tensor) -> torch.Tensor:
    """Expert counts of this rank's tokens -> the TP group's, scaled to this rank's total (as
    moec::balance_counts scales the data-parallel ranks'): a share of the group's tokens per expert."""
    if groups.get("tp") is None:
        return counts
    total = counts.detach().to(torch.float64).clone()
    dist.all_reduce(total, group=groups.get("tp"))
    return (total * (counts.sum() / total.sum())).to(counts.dtype)


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
        if how["style"] == "sequence":
            continue
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
        if how["style"] == "sequence":
            continue
        out[weight] = (0 if how["style"] == "colwise" else 1, how["parts"])
        if how["bias"] is not None and how["style"] == "colwise":
            out[how["bias"]] = (0, how["parts"])
    return out
