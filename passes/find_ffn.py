"""find_ffn: locate the dense feed-forward blocks of a captured transformer, by structure.

An FFN is an up projection, any elementwise subgraph, and a down projection:
  plain   out = down(f(up(x)))
  gated   out = down(f(up1(x), up3(x)))   (SwiGLU, GeGLU; a fused gate-up
          linear split or chunked in two halves counts as up1 and up3)
whatever the modules or attributes are called. A projection is aten.linear,
a transposed-weight addmm (Hugging Face Conv1D), or matmul/mm of the input
with a weight or its transpose (plus a bias add), weights being parameters
(get_attr). f is every pointwise op between the projections (views and
zero-probability dropouts looked through); it is named when it computes one
of the activations moec::experts fuses (relu, gelu, gelu_tanh, silu, gated
or not, however it is written: checked numerically over [-20, 20]), else
kept as an elementwise expression (moec.runtime.ops.elementwise) that the
experts evaluate between their GEMMs.

Rewrites nothing: it records one FFN per block in gm.meta["ffns"], in graph
order, with its weights (parameter name, row slice, transposed or not), its
activation, the block's module path (from nn_module_stack) and its nodes.
Invariant: every FFN's nodes feed nothing outside the FFN but its output.
A block that looks like an FFN but cannot be rewritten (a non-elementwise op
between the projections, a projection whose output also feeds something
else) is named with the reason; no FFN found is an error, not a silent no-op.
"""
import operator
from dataclasses import dataclass, field

import torch
import torch.fx

from moec.base.errors import MoecError
from moec.passes.base import Pass, PassResult
from moec.runtime.ops import elementwise
from moec.runtime.ops.experts import ACTIVATIONS

aten = torch.ops.aten
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
         aten.contiguous.default, aten.alias.default}
TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.mT.default}
MATMULS = {aten.matmul.default, aten.mm.default}


@dataclass
class WeightRef:
    """Where an FFN matrix lives: param name, rows [start, stop) of the [out, in]
    view, and whether the parameter is stored [in, out] (Conv1D)."""
    name: str
    start: int = 0
    stop: int | None = None
    transposed: bool = False

    def fetch(self, gm) -> torch.Tensor:
        from moec.base.graph import get_param
        w = get_param(gm, self.name)
        w = w.t() if self.transposed else w
        return w[self.start:self.stop]


@dataclass
class FFN:
    module: str
    x: torch.fx.Node
    out: torch.fx.Node
    activation: str  # a name in moec.runtime.ops.experts.ACTIVATIONS, or an elementwise expression
    w1: WeightRef
    w2: WeightRef
    w3: WeightRef | None = None
    b1: WeightRef | None = None
    b2: WeightRef | None = None
    b3: WeightRef | None = None
    nodes: set = field(default_factory=set)

    @property
    def gated(self) -> bool:
        return self.w3 is not None


class Rejected(Exception):
    """A block shaped like an FFN that cannot be rewritten; the message says why."""


def _is_noop_dropout(node) -> bool:
    return node.target == aten.dropout.default and node.args[1] == 0


def _through(node, nodes):
    """Walk back through views and no-op dropouts."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and (
            node.target in VIEWS or _is_noop_dropout(node)):
        nodes.add(node)
        node = node.args[0]
    return node


def _param(node):
    return node.target if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None


def _weight(node, nodes) -> WeightRef | None:
    """The right operand of a matmul: a 2-D parameter [in, out], or the transpose of one [out, in]."""
    if _param(node):
        return WeightRef(_param(node), transposed=True) if node.meta["val"].dim() == 2 else None
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and _param(node.args[0]) and (
            node.target in TRANSPOSES or (node.target == aten.transpose.int and set(node.args[1:]) in ({0, 1},
                                                                                                        {0, -1}))):
        nodes.add(node)
        return WeightRef(_param(node.args[0]))
    return None


def _bias(node):
    """The parameter a node adds to a projection's output: add(out, b) with b 1-D, either order."""
    if len(node.users) != 1:
        return None
    (add,) = node.users
    if not (add.op == "call_function" and add.target == aten.add.Tensor and len(add.args) == 2):
        return None
    other = add.args[1] if add.args[0] is node else add.args[0]
    return add if _param(other) and other.meta["val"].dim() == 1 else None


def _linear(node, nodes):
    """(input, WeightRef, bias WeightRef) if node is the output of a projection with parameter weights."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target == aten.linear.default and _param(node.args[1]):
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if bias is not None and not _param(bias):
            return None
        nodes.add(node)
        return _through(node.args[0], nodes), WeightRef(_param(node.args[1])), bias and WeightRef(_param(bias))
    if node.target == aten.addmm.default and _param(node.args[0]) and _param(node.args[2]):
        nodes.add(node)
        return (_through(node.args[1], nodes), WeightRef(_param(node.args[2]), transposed=True),
                WeightRef(_param(node.args[0])))
    if node.target == aten.add.Tensor and len(node.args) == 2:  # matmul + bias
        for mm, b in (node.args, node.args[::-1]):
            if isinstance(mm, torch.fx.Node) and mm.target in MATMULS and _param(b) and _bias(mm) is node:
                found = _linear(mm, nodes)
                if found is not None:
                    nodes.add(node)
                    return found[0], found[1], WeightRef(_param(b))
        return None
    if node.target in MATMULS:
        w = _weight(node.args[1], nodes)
        if w is not None:
            nodes.add(node)
            return _through(node.args[0], nodes), w, None
    return None


def _part(node, nodes):
    """(linear match, start, stop) if node is a slice of a projection's output along its last dimension
    (a split or chunk item, or a slice)."""
    if node.op != "call_function":
        return None
    last = lambda dim, t: dim in (-1, t.dim() - 1)
    if node.target == operator.getitem:
        split = node.args[0]
        if split.op != "call_function" or split.target not in (aten.split.Tensor, aten.split_with_sizes.default,
                                                               aten.chunk.default):
            return None
        parts = split.meta["val"]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        if not last(dim, parts[0]):
            return None
        widths = [p.shape[-1] for p in parts]
        start = sum(widths[:node.args[1]])
        source, stop, extra = split.args[0], start + widths[node.args[1]], {node, split}
    elif node.target == aten.slice.Tensor:
        dim, start, stop = (list(node.args[1:4]) + [0, 0, None])[:3]
        src_val = node.args[0].meta["val"]
        if not last(dim, src_val) or not isinstance(start, int) or not isinstance(stop, int):
            return None
        source, stop, extra = node.args[0], min(stop, src_val.shape[-1]), {node}
    else:
        return None
    lin = _linear(_through(source, nodes), nodes)
    if lin is None:
        return None
    nodes.update(extra)
    return lin, start, stop


def _projection(node, nodes):
    """("linear", match) or ("part", match) when node is a projection's output (or a slice of one)."""
    lin = _linear(node, nodes)
    if lin is not None:
        return "linear", lin
    part = _part(node, nodes)
    return ("part", part) if part is not None else None


def _tensor_args(node):
    return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.fx.Node)]


def _op_name(node) -> str:
    t = node.target
    return f"aten.{t._opname}.{t._overloadname}" if isinstance(t, torch._ops.OpOverload) else str(t)


def _elementwise(node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and \
        elementwise.admitted(node.target)


def _region(h, nodes):
    """Walk back from h (the down projection's input) through pointwise ops to the projections:
    (pointwise nodes, {leaf node: projection}, nodes that are neither)."""
    region, ups, blockers, stack, seen = [], {}, [], [h], set()
    while stack:
        n = _through(stack.pop(), nodes)
        if n in seen:
            continue
        seen.add(n)
        up = _projection(n, nodes)
        if up is not None:
            ups[n] = up
        elif _elementwise(n):
            region.append(n)
            stack.extend(_tensor_args(n))
        else:
            blockers.append(n)
    return region, ups, blockers


def _describe(n) -> str:
    return _op_name(n) if n.op == "call_function" else f"{n.op} {n.target}"


def _in_module(node, module: str) -> bool:
    """Whether node belongs to module or a submodule of it ("" is the root's own nodes only)."""
    where = _where(node)
    return where == module or bool(module) and where.startswith(module + ".")


def _blocked_ffn(blockers, width: int, module: str) -> str | None:
    """The reason a block is an FFN moec cannot rewrite: an op that is not elementwise stands between a
    projection of the down projection's input width, in the same module, and the down projection."""
    for b in blockers:
        for a in _tensor_args(b) if b.op == "call_function" else []:
            _, ups, _ = _region(a, set())
            for leaf in ups:
                val = leaf.meta.get("val")
                if isinstance(val, torch.Tensor) and val.shape[-1] == width and _in_module(leaf, module):
                    return f"{_describe(b)} between the projections is not elementwise"
    return None


def _render(a, names):
    if isinstance(a, torch.fx.Node):
        return names[_through(a, set())]
    return repr(a)


def _expression(region, names) -> str:
    """The region as elementwise statements over h1 (and h3)."""
    order = {n: i for i, n in enumerate(next(iter(region)).graph.nodes)}
    lines = []
    for n in sorted(region, key=order.__getitem__):
        name = n.name if n.name not in elementwise.INPUTS else f"{n.name}_"
        names[n] = name
        if n.target in elementwise.CAST_OPS:  # every cast as to.dtype: device and layout are the experts' own
            lines.append(f"{name} = aten.to.dtype({_render(n.args[0], names)}, dtype={n.meta['val'].dtype!r})")
            continue
        args = [_render(a, names) for a in n.args] + [f"{k}={_render(v, names)}" for k, v in n.kwargs.items()]
        lines.append(f"{name} = {_op_name(n)}({', '.join(args)})")
    return "; ".join(lines)


_PROBE = torch.linspace(-20, 20, 4001, dtype=torch.float64)
_OTHER = torch.randn(4001, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4


def _close(y, ref) -> bool:
    return y.shape == ref.shape and bool(((y - ref).abs() <= 1e-5 * (1 + ref.abs())).all())


def _name(expression: str, gated: bool):
    """(activation name, swapped) when the expression computes a fused activation (gated: act(h1) * h3, or
    act(h3) * h1 when swapped), else (expression, False)."""
    a, b = _PROBE, _OTHER
    y = elementwise.evaluate(expression, a, b if gated else None).double()
    for name, act in ACTIVATIONS.items():
        if not gated and _close(y, act(a)):
            return name, False
        if gated and _close(y, act(a) * b):
            return name, False
        if gated and _close(y, act(b) * a):
            return name, True
    return expression, False


def _up_weights(ups, nodes):
    """(x, [(W, B) for h1, h3]) of the projections the region reads; Rejected when they are no FFN's."""
    found = list(ups.values())
    if len(found) > 2:
        raise Rejected(f"the elementwise part reads {len(found)} projections (at most 2: gate and up)")
    kinds = {k for k, _ in found}
    if kinds == {"linear"}:
        xs = {m[0] for _, m in found}
        if len(xs) != 1:
            raise Rejected("the projections read different inputs")
        return xs.pop(), [(m[1], m[2]) for _, m in found]
    if kinds == {"part"}:
        lin = found[0][1][0]
        if any(m[0][1].name != lin[1].name for _, m in found):
            raise Rejected("the slices come from different projections")
        rows = lambda ref, start, stop: ref and WeightRef(ref.name, start, stop, ref.transposed)
        return lin[0], [(rows(lin[1], start, stop), rows(lin[2], start, stop)) for _, (_, start, stop) in found]
    raise Rejected("the elementwise part reads a projection and a slice of another")


def _match(down_node: torch.fx.Node) -> FFN | None:
    """The FFN whose down projection outputs down_node, None when down_node is no projection of an FFN;
    Rejected when it is one that cannot be rewritten."""
    nodes = set()
    down = _linear(down_node, nodes)
    if down is None or (down_node.target in MATMULS and _bias(down_node) is not None):
        return None  # a matmul whose bias add follows is matched at the add
    h, w2, b2 = down
    if not isinstance(h, torch.fx.Node) or _projection(h, set()) is not None:
        return None  # two projections in a row: no elementwise part
    region, ups, blockers = _region(h, nodes)
    if blockers:
        # a projection behind a norm in another module (the residual stream: attention's output before
        # the FFN's norm, the last FFN before the head's) is no FFN of this one
        if any(_in_module(up, _where(down_node)) for up in ups):
            raise Rejected(f"{_describe(blockers[0])} between the projections is not elementwise")
        why = _blocked_ffn(blockers, h.meta["val"].shape[-1], _where(down_node))
        if why:
            raise Rejected(why)
        return None
    if not ups:
        return None
    x, weights = _up_weights(ups, nodes)
    nodes.update(region)
    names = dict(zip(ups, elementwise.INPUTS))
    expression = _expression(region, names)
    activation, swapped = _name(expression, len(weights) == 2)
    if swapped:
        weights.reverse()
    out = down_node
    while tuple(out.meta["val"].shape) != tuple(x.meta["val"].shape) and len(out.users) == 1 and \
            next(iter(out.users)).target in VIEWS:  # Conv1D: addmm on 2-D, viewed back
        out = next(iter(out.users))
        nodes.add(out)
    if tuple(out.meta["val"].shape) != tuple(x.meta["val"].shape):
        return None
    for n in nodes - {out}:
        outside = [u for u in n.users if u not in nodes]
        if outside:
            path = [p for p, _ in (n.meta.get("nn_module_stack") or {}).values()]
            raise Rejected(f"{n.name} ({path[-1] if path else 'the block'}) also feeds {outside[0].name} "
                           f"({_op_name(outside[0])}) outside the FFN")
    (w1, b1), (w3, b3) = weights[0], weights[1] if len(weights) == 2 else (None, None)
    return FFN(module=_module(nodes), x=x, out=out, activation=activation, w1=w1, b1=b1, w2=w2, b2=b2,
               w3=w3, b3=b3, nodes=nodes)


def _module(nodes) -> str:
    """Deepest module that every node of the block came from."""
    stacks = [[path for path, _ in n.meta.get("nn_module_stack", {}).values()] for n in nodes
              if n.meta.get("nn_module_stack")]
    common = []
    for level in zip(*stacks):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return common[-1] if common else ""


def _where(node) -> str:
    """The module that holds the projection node belongs to (the FFN's, for a down projection)."""
    path = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
    return (path[-2] if len(path) > 1 else path[-1]) if path else ""


class FindFFN(Pass):
    name = "find_ffn"
    provides = ("ffns",)

    def __init__(self):
        self.rejected = []

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        ffns, seen, self.rejected = [], set(), []
        for node in gm.graph.nodes:
            if node in seen or node.op != "call_function":
                continue
            try:
                m = _match(node)
            except Rejected as e:
                self.rejected.append(f"{_where(node) or '<root>'}: left dense: {e}")
                continue
            if m is not None:
                ffns.append(m)
                seen |= m.nodes
        if not ffns:
            why = f": {self.rejected[0]}" if self.rejected else (
                " (looked for up projection -> elementwise ops -> down projection, gated or not); "
                "is this a transformer with dense FFNs?")
            raise MoecError(f"find_ffn: no feed-forward block moec can upcycle{why}")
        gm.meta["ffns"] = ffns
        return PassResult(gm, False)

    def warnings(self, gm: torch.fx.GraphModule) -> list[str]:
        return list(self.rejected)

    def report(self, gm: torch.fx.GraphModule) -> list[str]:
        lines = [f"{len(gm.meta['ffns'])} dense FFN blocks:"]
        for f in gm.meta["ffns"]:
            w1 = f.w1.fetch(gm)
            kind = "gated" if f.gated else "plain"
            act = f.activation if not elementwise.is_expression(f.activation) else (
                "elementwise (" + ", ".join(s.op._opname for s in elementwise.parse(f.activation)) + ")")
            lines.append(f"  {f.module or '<root>'}: {kind} {act}, D={w1.shape[1]} F={w1.shape[0]}, "
                         f"W1 {f.w1.name}" + (f", W3 {f.w3.name}" if f.w3 else "") + f", W2 {f.w2.name}")
        return lines + self.rejected
