"""One fx graph as the body of a readable `forward`.

fx prints a graph as one statement per node; this turns the literals a call
passes by position into named arguments (from the op's schema), drops the
`x = None` bookkeeping fx appends, ends every tensor line with its shape as a
comment, and names the imports the code uses and no others.
"""
import inspect
import keyword
import re

import torch
import torch.fx
from torch.fx.graph_module import _format_import_statement
from torch.package import sys_importer

_DELETES = re.compile(r";  (?:\w+ = )+None$")
_KWARG = re.compile(r"([(,] ?)(\w+) = ")
_UNBACKED = re.compile(r"\bu\d+\b")
_KWARG_NAME = re.compile(r"\b\w+=")
_ASSIGN = re.compile(r"^\s*([\w, ]+?) = ")


def _names(target) -> list[str] | None:
    """Positional parameter names of a call target, or None when they cannot be used as keywords."""
    if isinstance(target, torch._ops.OpOverload):
        names = [a.name for a in target._schema.arguments if not a.kwarg_only]
    else:
        try:
            params = inspect.signature(target).parameters.values()
        except (TypeError, ValueError):
            return None
        if any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params):
            return None
        names = [p.name for p in params]
    if any(keyword.iskeyword(n) or not n.isidentifier() for n in names):
        return None
    return names


def _is_value(a) -> bool:
    return isinstance(a, torch.fx.Node) or (isinstance(a, (list, tuple)) and a and
                                            all(isinstance(x, torch.fx.Node) for x in a))


def name_literals(graph: torch.fx.Graph) -> None:
    """From the first argument that is a literal on, pass every argument by its name."""
    for node in graph.nodes:
        if node.op != "call_function" or len(node.args) < 2:
            continue
        first = next((i for i, a in enumerate(node.args) if i and not _is_value(a)), None)
        names = _names(node.target) if first is not None else None
        if names is None or len(names) < len(node.args) or set(names[first:len(node.args)]) & set(node.kwargs):
            continue
        node.kwargs = {**dict(zip(names[first:], node.args[first:])), **node.kwargs}
        node.args = node.args[:first]


def _shape(node: torch.fx.Node, dims: dict) -> str | None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    sizes = []
    for d in val.shape:
        text = str(d)
        for symbol, name in dims.items():
            text = re.sub(rf"\b{symbol}\b", name, text)
        text = _UNBACKED.sub("R", text)  # a data-dependent row count (what a rank receives), any layer
        sizes.append(text)
    return f"[{', '.join(sizes)}]"


def forward_source(graph: torch.fx.Graph, dims: dict) -> tuple[str, dict]:
    """(the `def forward` source, the globals it uses); dims: {symbol: name} for the shape comments."""
    code = graph.python_code(root_module="self")
    by_name = {n.name: n for n in graph.nodes}
    lines = []
    for line in code.src.strip("\n").splitlines():
        line = _KWARG.sub(r"\1\2=", _DELETES.sub("", line.rstrip()))
        match = _ASSIGN.match(line)
        target = by_name.get(match.group(1)) if match else None
        shape = _shape(target, dims) if target is not None else None
        lines.append(f"{line}  # {shape}" if shape else line)
    src = "\n".join(lines).rstrip()
    names = _KWARG_NAME.sub("", src)
    used = {k: v for k, v in code.globals.items()
            if k != "getattr" and re.search(rf"(?<![\w.]){re.escape(k)}\b", names)}
    return src, used


def imports(globals_: dict) -> list[str]:
    return sorted({_format_import_statement(n, o, sys_importer) for n, o in globals_.items()})
