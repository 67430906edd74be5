"""Following a tensor-parallel split through the code between a column-parallel linear and the row-parallel
one (tensor_parallel's regions): which dimension of each activation is split over the TP ranks (the output
features, then the heads they are viewed as, wherever transposes, stacks and flattens move them), and the
rewrites that make that code read its local sizes: a view, reshape or expand gives the split dimension as
-1, a split of it into equal pieces becomes a chunk. What it cannot follow is a MoecError naming the node.
"""
import math
import operator

import sympy
import torch
import torch.fx

from moec.base.errors import MoecError

aten = torch.ops.aten
LINEAR, SDPA = aten.linear.default, aten.scaled_dot_product_attention.default
SIZED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


def follow(n: torch.fx.Node, where: dict, module: str, parts: dict, tp: int) -> int:
    """Which dim of n's value is split over the TP ranks, given where ({node: its split dim}) for its inputs;
    rewrites n's sizes to local ones. parts: {column-parallel linear: pieces its output is split in}, updated."""
    src = next(a for a in n.all_input_nodes if a in where)
    d = where[src]
    if n.target is operator.getitem:
        return d
    val, ins = n.meta.get("val"), src.meta["val"]
    if n.target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
        dim = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % ins.dim()
        if dim == d and n.target is not aten.chunk.default:
            sizes = [v.shape[dim] for v in val]
            if len(set(sizes)) != 1:
                raise MoecError(f"--tp {tp}: {module} splits its projection into unequal pieces "
                                f"{sizes}; use --tp 1")
            n.target, n.args, n.kwargs = aten.chunk.default, (n.args[0], len(sizes), dim), {}
            if src in parts:
                parts[src] = len(sizes)
        return d
    if n.target is aten.transpose.int:
        a, b = (x % ins.dim() for x in n.args[1:3])
        return b if d == a else a if d == b else d
    if n.target is aten.permute.default:
        return [x % ins.dim() for x in n.args[1]].index(d)
    if n.target is SDPA:
        if d != 1:
            raise MoecError(f"--tp {tp}: the attention of {module} does not split q/k/v by heads; use --tp 1")
        return 1
    if n.target in SIZED:
        return _resize(n, src, d, module, tp)
    if n.target in (aten.unsqueeze.default, aten.stack.default):  # a new dim k before or after d
        k = (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) % (ins.dim() + 1)
        return d + (k <= d)
    if n.target is aten.flatten.using_ints:
        start, end = (k % ins.dim() for k in (n.args[1] if len(n.args) > 1 else 0,
                                               n.args[2] if len(n.args) > 2 else -1))
        if start < d <= end:
            raise MoecError(f"--tp {tp}: {n.name} in {module} flattens the split dim into another; "
                            f"use --tp 1")
        return d if d <= start else d - (end - start)
    if not isinstance(val, torch.Tensor) or val.dim() != ins.dim():
        raise MoecError(f"--tp {tp}: in {module}, {n.name} ({n.target}) changes the rank of the split "
                        f"activations in a way tensor parallelism does not follow; use --tp 1")
    # a norm, softmax or slice across the heads would see only this rank's (grouped heads repeat in place)
    if d in _dims(n, ins.dim()) and n.target is not aten.repeat_interleave.self_int:
        raise MoecError(f"--tp {tp}: in {module}, {n.name} ({n.target}) works across the heads (or the features "
                        f"they come from), which TP splits; use --tp 1")
    for a in n.all_input_nodes:  # a whole-width tensor (a norm's weight over all heads) against the split one
        v = a.meta.get("val")
        i = d - (val.dim() - v.dim()) if isinstance(v, torch.Tensor) else -1
        if 0 <= i < v.dim() and v.shape[i] != 1 and a not in where:
            raise MoecError(f"--tp {tp}: in {module}, {n.name} combines the split activations with {a.name}, "
                            f"which spans all heads; use --tp 1")
    return d  # elementwise, matmul, slicing within a head: the dims keep their places


def _dims(n: torch.fx.Node, rank: int) -> set[int]:
    """The dims an aten op's `dim` argument names (reductions, softmax, slice, cat), counted from 0."""
    schema = getattr(n.target, "_schema", None)
    for i, arg in enumerate(schema.arguments if schema is not None else ()):
        if arg.name == "dim":
            value = n.args[i] if i < len(n.args) else n.kwargs.get("dim", arg.default_value)
            values = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
            return {v % rank for v in values if isinstance(v, int)}
    return set()

def _resize(n: torch.fx.Node, src: torch.fx.Node, d: int, module: str, tp: int) -> int:
    ins, outs = _numbers(src.meta["val"].shape), _numbers(n.meta["val"].shape)
    sizes = list(n.args[1])
    if n.target is aten.expand.default:
        j = d + len(outs) - len(ins)
    else:
        before = math.prod(ins[:d])
        j = next((j for j in range(len(outs)) if math.prod(outs[:j]) == before and outs[j] > 1), None)
    if j is None or isinstance(sizes[j], torch.fx.Node):
        raise MoecError(f"--tp {tp}: cannot give {n.name} in {module} the local sizes of a TP rank; "
                        f"use --tp 1")
    shape = n.meta["val"].shape
    for i, s in enumerate(sizes):
        if i != j and s == -1 and n.target is not aten.expand.default:
            if not isinstance(shape[i], int):
                raise MoecError(f"--tp {tp}: {n.name} in {module} infers a size (-1) that tensor "
                                f"parallelism needs for the heads; use --tp 1")
            sizes[i] = shape[i]
    sizes[j] = -1
    n.update_arg(1, sizes)
    return j


def _numbers(shape) -> list[int]:
    """A shape with each symbol (batch, sequence) replaced by its own large prime: products compare as the
    symbolic ones do."""
    primes = {}
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
            continue
        expr = d.node.expr
        subs = {s: primes.setdefault(s, sympy.prime(1000 + len(primes))) for s in expr.free_symbols}
        out.append(int(expr.subs(subs)))
    return out
