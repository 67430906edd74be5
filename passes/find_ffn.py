"""find_ffn: locate the dense feed-forward blocks of a captured transformer.

Matches, whatever the modules or attributes are called:
  plain   up = linear(x, W1, b1); h = act(up);                  out = linear(h, W2, b2)
  gated   h = act(linear(x, W1)) * linear(x, W3)  (SwiGLU, GeGLU); out = linear(h, W2)
  fused   gate and up from one linear(x, W13) split in two halves, then as gated
where act is gelu (erf or tanh), relu or silu, `linear` is aten.linear or a
transposed-weight addmm (Hugging Face Conv1D) and views, reshapes and
zero-probability dropouts in between are looked through; tanh-GELU written
out elementwise (Hugging Face's "gelu_new") counts as gelu_tanh. Weights must be
parameters (get_attr).

Rewrites nothing: it records one FFN per block in gm.meta["ffns"], in graph
order, with its weights (parameter name, row slice, transposed or not), its
activation, the block's module path (from nn_module_stack) and its nodes.
Invariant: every FFN's nodes feed nothing outside the FFN but its output.
No FFN found is an error, not a silent no-op.
"""
import operator
from dataclasses import dataclass, field

import torch
import torch.fx

from moec.base.errors import MoecError
from moec.passes.base import Pass, PassResult

aten = torch.ops.aten
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
         aten.contiguous.default}
ACTS = {aten.gelu.default: "gelu", aten.relu.default: "relu", aten.silu.default: "silu"}


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
    activation: str
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


def _through(node, nodes):
    """Walk back through views and no-op dropouts."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and (
            node.target in VIEWS or (node.target == aten.dropout.default and node.args[1] == 0)):
        nodes.add(node)
        node = node.args[0]
    return node


def _only_user(node, nodes):
    """Follow a node's single user through views and no-op dropouts."""
    while len(node.users) == 1:
        (u,) = node.users
        if u.op == "call_function" and (u.target in VIEWS or (u.target == aten.dropout.default and u.args[1] == 0)):
            nodes.add(u)
            node = u
            continue
        return u
    return None


def _param(node):
    return node.target if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None


def _linear(node, nodes):
    """(input, WeightRef, bias WeightRef) if node is a linear with parameter weights."""
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
    return None


def _half(node, nodes):
    """(linear match, half index) if node is one half of a split linear output."""
    if not (node.op == "call_function" and node.target == operator.getitem):
        return None
    split = node.args[0]
    if split.op != "call_function" or split.target not in (aten.split.Tensor, aten.chunk.default):
        return None
    parts = split.meta["val"]
    if len(parts) != 2 or split.args[-1] not in (-1, parts[0].dim() - 1) or parts[0].shape[-1] != parts[1].shape[-1]:
        return None
    lin = _linear(_through(split.args[0], nodes), nodes)
    if lin is None:
        return None
    nodes.update({node, split})
    return lin, node.args[1], parts[0].shape[-1]


def _fn(node, target):
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == target


def _scalar_arg(node, target, value):
    """The tensor operand of `target(tensor, value)` (either order), or None."""
    if not _fn(node, target) or len(node.args) != 2:
        return None
    a, b = node.args
    if isinstance(b, (int, float)) and abs(b - value) < 1e-6:
        return a
    if isinstance(a, (int, float)) and abs(a - value) < 1e-6:
        return b
    return None


def _tanh_gelu(node):
    """0.5 * v * (1 + tanh(sqrt(2/pi) * (v + 0.044715 * v^3))) written out (HF "gelu_new"): (v, nodes)."""
    if not _fn(node, aten.mul.Tensor):
        return None
    for half, one_plus in (node.args, node.args[::-1]):
        v = _scalar_arg(half, aten.mul.Tensor, 0.5)
        t = _scalar_arg(one_plus, aten.add.Tensor, 1.0)
        inner = _scalar_arg(t.args[0] if _fn(t, aten.tanh.default) else None, aten.mul.Tensor, 0.7978845608028654)
        if v is None or inner is None or not _fn(inner, aten.add.Tensor) or v not in inner.args:
            continue
        cube = _scalar_arg(next(a for a in inner.args if a is not v), aten.mul.Tensor, 0.044715)
        if _fn(cube, aten.pow.Tensor_Scalar) and cube.args == (v, 3.0):
            return v, {node, half, one_plus, t, t.args[0], inner, inner.args[0], inner.args[1], cube}
    return None


def _activation(node):
    """(input, name, nodes) if node computes an activation the MoE experts support."""
    if node.op != "call_function":
        return None
    if node.target in ACTS:
        name = ACTS[node.target]
        if name == "gelu" and node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none") == "tanh":
            name = "gelu_tanh"
        return node.args[0], name, {node}
    found = _tanh_gelu(node)
    return (found[0], "gelu_tanh", found[1]) if found else None


def _match(act: torch.fx.Node) -> FFN | None:
    found = _activation(act)
    if found is None:
        return None
    src, name, nodes = found
    nodes = set(nodes)
    src = _through(src, nodes)
    up, w3 = _linear(src, nodes), None
    half = None if up else _half(src, nodes)
    if up is None and half is None:
        return None
    user = _only_user(act, nodes)
    if user is not None and user.op == "call_function" and user.target == aten.mul.Tensor:
        other = next((a for a in user.args if a is not act and a not in nodes), None)
        other = _through(other, nodes) if isinstance(other, torch.fx.Node) else None
        if other is None:
            return None
        if half:
            other_half = _half(other, nodes)
            if not other_half or other_half[0][1].name != half[0][1].name or other_half[1] == half[1]:
                return None
            (x, w, b), idx, width = half
            up = (x, WeightRef(w.name, idx * width, (idx + 1) * width, w.transposed),
                  b and WeightRef(b.name, idx * width, (idx + 1) * width))
            w3 = (x, WeightRef(w.name, (1 - idx) * width, (2 - idx) * width, w.transposed),
                  b and WeightRef(b.name, (1 - idx) * width, (2 - idx) * width))
        else:
            w3 = _linear(other, nodes)
            if w3 is None or w3[0] is not up[0]:
                return None
        nodes.add(user)
        user = _only_user(user, nodes)
    elif half:
        return None
    down = _linear(user, nodes) if user is not None else None
    if down is None:
        return None
    x, out = up[0], user
    while tuple(out.meta["val"].shape) != tuple(x.meta["val"].shape) and len(out.users) == 1 and \
            next(iter(out.users)).target in VIEWS:  # Conv1D: addmm on 2-D, viewed back
        out = next(iter(out.users))
        nodes.add(out)
    if tuple(out.meta["val"].shape) != tuple(x.meta["val"].shape):
        return None
    if any(u not in nodes for n in nodes - {out} for u in n.users):
        return None
    return FFN(module=_module(nodes), x=x, out=out, activation=name, w1=up[1], b1=up[2], w2=down[1], b2=down[2],
               w3=w3 and w3[1], b3=w3 and w3[2], nodes=nodes)


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


class FindFFN(Pass):
    name = "find_ffn"
    provides = ("ffns",)

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        ffns, seen = [], set()
        for node in gm.graph.nodes:
            if node not in seen:
                m = _match(node)
                if m is not None:
                    ffns.append(m)
                    seen |= m.nodes
        if not ffns:
            raise MoecError("find_ffn: no feed-forward block found (looked for linear -> gelu/relu/silu -> linear, "
                            "gated or not); is this a transformer with dense FFNs?")
        gm.meta["ffns"] = ffns
        return PassResult(gm, False)

    def report(self, gm: torch.fx.GraphModule) -> list[str]:
        lines = [f"{len(gm.meta['ffns'])} dense FFN blocks:"]
        for f in gm.meta["ffns"]:
            w1 = f.w1.fetch(gm)
            kind = "gated" if f.gated else "plain"
            lines.append(f"  {f.module or '<root>'}: {kind} {f.activation}, D={w1.shape[1]} F={w1.shape[0]}, "
                         f"W1 {f.w1.name}" + (f", W3 {f.w3.name}" if f.w3 else "") + f", W2 {f.w2.name}")
        return lines
