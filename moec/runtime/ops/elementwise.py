"""An FFN's elementwise part as text: what moec::experts computes between the
two projections when it is none of the activations its kernels fuse.

find_ffn writes the ops it found between an FFN's up and down projections as
one statement per op over the pre-activations h1 (and, gated, h3):

    "relu = aten.relu.default(h1); pow_1 = aten.pow.Tensor_Scalar(relu, 2)"

The last name is the result. The text travels in the op's `activation`
string, so a build's model.py, its checkpoints and every rank carry it with
no registry. Only pointwise aten ops (and dtype casts) are admitted, with
names, numbers, strings, booleans and None as arguments.
"""
import ast
import functools
from dataclasses import dataclass

import torch

from moec.base.errors import MoecError

INPUTS = ("h1", "h3")
aten = torch.ops.aten
CAST_OPS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default}


def is_expression(activation: str) -> bool:
    return "(" in activation


def admitted(op: torch._ops.OpOverload) -> bool:
    """Whether op may appear in an expression: pointwise, or a dtype cast."""
    return torch.Tag.pointwise in op.tags or op in CAST_OPS


@dataclass(frozen=True)
class Ref:
    """An argument that names an input or an earlier step."""
    name: str


@dataclass(frozen=True)
class Step:
    name: str
    op: torch._ops.OpOverload
    args: tuple
    kwargs: tuple  # ((key, value), ...)


def _literal(node, names):
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ValueError(f"{node.id} is used before it is defined")
        return Ref(node.id)
    value = ast.literal_eval(node)
    if isinstance(value, torch.dtype) or value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"argument {ast.unparse(node)} is not a name or a literal")


def _dtype(node):
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
        dtype = getattr(torch, node.attr, None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return None


def _arg(node, names):
    dtype = _dtype(node)
    return dtype if dtype is not None else _literal(node, names)


def _op(func) -> torch._ops.OpOverload:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not (isinstance(func, ast.Name) and func.id == "aten" and len(parts) == 2):
        raise ValueError(f"{ast.unparse(func)} is not an aten op (aten.NAME.OVERLOAD)")
    op = getattr(getattr(torch.ops.aten, parts[1]), parts[0])
    if not admitted(op):
        raise ValueError(f"aten.{parts[1]}.{parts[0]} is not elementwise")
    return op


@functools.lru_cache(maxsize=256)
def parse(text: str) -> tuple[Step, ...]:
    """The steps of an expression; MoecError naming what is wrong."""
    try:
        tree = ast.parse("\n".join(part.strip() for part in text.split(";")))
        names, steps = set(INPUTS), []
        for stmt in tree.body:
            if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                    and isinstance(stmt.value, ast.Call)):
                raise ValueError(f"`{ast.unparse(stmt)}` is not `name = aten.op(args)`")
            call = stmt.value
            steps.append(Step(stmt.targets[0].id, _op(call.func), tuple(_arg(a, names) for a in call.args),
                              tuple((k.arg, _arg(k.value, names)) for k in call.keywords)))
            names.add(stmt.targets[0].id)
        if not steps:
            raise ValueError("no statements")
    except (SyntaxError, ValueError, AttributeError) as e:
        raise MoecError(f"activation expression {text!r}: {e}") from None
    return tuple(steps)


def uses_h3(text: str) -> bool:
    return any(a == Ref("h3") for s in parse(text) for a in (*s.args, *(v for _, v in s.kwargs)))


def evaluate(text: str, h1, h3=None, call=None):
    """The expression's value at h1 (and h3). call(op, args, kwargs) runs each op: by default the op
    itself; an fx graph passes its call_function to emit the ops as nodes."""
    call = call or (lambda op, args, kwargs: op(*args, **kwargs))
    env = {"h1": h1, "h3": h3}
    get = lambda a: env[a.name] if isinstance(a, Ref) else a
    for s in parse(text):
        env[s.name] = call(s.op, tuple(get(a) for a in s.args), {k: get(v) for k, v in s.kwargs})
    return env[s.name]
