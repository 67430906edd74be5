"""Emit stages.py: a build's pipeline stages, cut from model.py's forward at layer boundaries.

Each stage is a subclass of model.py's Model with a forward of its own: the
first runs what comes before the layers (the embedding) and its run of
layers, a middle one its layers, the last its layers and what comes after
them (the final norm, the head). A stage after the first takes the hidden
state and recomputes what the layers read besides it (sizes, position
tables) from its shape. Each stage returns one tensor, through
`moec.runtime.stage_output`, which adds its layers' aux and z losses to the
loss through autograd (no extra outputs travel between stages) and keeps
their expert counts for the training loop. The class attributes say which of
the model's parameters a stage holds: `LAYERS` (the loop's container and the
range of its layers) and `READS` (the parameters and buffers outside the
layers that its forward reads); the runtime builds each rank's stages from
the full model with those, under the model's own names.
"""
import operator

import torch
import torch.fx

from moec.base.errors import MoecError
from moec.codegen.program import top_graph
from moec.codegen.render import forward_source, imports
from moec.runtime.training.pipeline import stage_output

HEADER = '''"""Pipeline stages of {title}: {stages} stages, layers {bounds}.

Written by `moec compile --pp`; each stage is model.py's Model with the forward of its part (see
moec.runtime.training.pipeline for how train.py runs them).
"""
'''
LOSS_KEYS = ("aux_loss", "z_loss")
SIZE_OPS = (torch.ops.aten.sym_size.int,)


def _loop(top):
    """The one loop of layers that carries one hidden state, its call node and slot positions."""
    if len(top.runs) != 1:
        raise MoecError(f"--pp cuts the model's layers into stages, and this model has {len(top.runs)} loops of "
                        f"layers (model.py); pipeline parallelism needs exactly one")
    run = top.runs[0]
    slots = top.returns[run]
    carried = [i for i, (kind, _, _) in enumerate(slots) if kind == "carry"]
    if len(carried) != 1:
        raise MoecError(f"--pp: the layers of {run.container} carry {len(carried)} values from one to the next; "
                        f"pipeline stages pass one hidden state")
    call = next(n for n in top.graph.nodes if n.op == "call_module" and n.target == run.container)
    arg = next(j for j, k in run.carry.items() if k == slots[carried[0]][1])
    return run, call, carried[0], arg, slots


def _outputs(top) -> dict:
    out = next(n for n in top.graph.nodes if n.op == "output")
    if not isinstance(out.args[0], dict) or "logits" not in out.args[0]:
        raise MoecError("--pp: the model's forward must return a dict with logits (model.py)")
    return out.args[0]


def _needed(roots, stop) -> list:
    """The nodes roots depend on, in graph order, not looking past the nodes in stop."""
    roots = [r for r in roots if isinstance(r, torch.fx.Node)]
    seen, todo = set(), list(roots)
    while todo:
        n = todo.pop()
        if n in seen or n in stop:
            continue
        seen.add(n)
        todo += n.all_input_nodes
    return [n for n in roots[0].graph.nodes if n in seen] if roots else []


def _shape_only(n: torch.fx.Node) -> bool:
    """n reads only what the hidden state [B, T, D] has as the token ids [B, T] do: batch, length, device."""
    if n.target in SIZE_OPS:
        return n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None) in (0, 1)
    return n.target is getattr and n.args[1] == "device"


def _stage_graph(top, index: int, count: int, lo: int, hi: int) -> torch.fx.Graph:
    run, call, carry_slot, carry_arg, slots = _loop(top)
    outputs = _outputs(top)
    nodes = list(top.graph.nodes)
    tokens = next(n for n in nodes if n.op == "placeholder")  # the token ids
    items = {u.args[1]: u for u in call.users if u.target is operator.getitem} if len(slots) > 1 else {0: call}
    g, env = torch.fx.Graph(), {}

    def copy(n):
        env[n] = g.node_copy(n, lambda a: env[a])
        env[n].meta["val"] = n.meta.get("val")

    carried = items[carry_slot]
    moe = any(lo <= b.index < hi for b in run.returning) and any(k in outputs for k in LOSS_KEYS)
    losses = LOSS_KEYS if moe else ()  # a stage of dense layers only has no MoE losses to add
    keys = losses + (("logits",) if index == count - 1 else ())
    after = _needed([outputs[k] for k in keys if k in outputs], {call, *items.values()})
    before = set(nodes[:nodes.index(call)])
    if index == 0:
        for n in nodes[:nodes.index(call)]:
            copy(n)
    else:  # the hidden state comes in; what else the layers (and the head) read is made again from its sizes
        hidden = call.args[carry_arg]
        if hidden in after:
            raise MoecError(f"--pp: the head reads {hidden.name}, the input of the first layer, which only the "
                            f"first stage has")
        env[tokens] = env[hidden] = x = g.placeholder("x")
        x.meta["val"] = hidden.meta.get("val")
        others = [a for j, a in enumerate(call.args) if j != carry_arg]
        for n in _needed(others + [n for n in after if n in before], {hidden, tokens}):
            if tokens in n.all_input_nodes and not _shape_only(n):
                raise MoecError(f"--pp: the layers read {n.name}, made from the token ids before the first layer; "
                                f"a later stage has only the hidden state")
            copy(n)
    copy(call)
    for i in sorted(items):
        copy(items[i])
    for n in after:
        if n in before:
            continue
        if index < count - 1 and carried in n.all_input_nodes:
            raise MoecError(f"--pp: the model's {n.name} reads the last layer's output outside the loss")
        copy(n)
    counts = outputs.get("expert_counts")
    kwargs = {k: env[outputs[k]] for k in losses if k in outputs}
    if moe and isinstance(counts, torch.fx.Node):
        kwargs["expert_counts"] = env[counts]
    elif moe and isinstance(counts, (list, tuple)):  # one MoE layer: the loop returns its counts as a sum of one
        kwargs["expert_counts"] = [env[c] for c in counts]
    value = env[outputs["logits"]] if index == count - 1 else env[carried]
    g.output(g.call_function(stage_output, (value,), {"stage": index, **kwargs}))
    for n in reversed(list(g.nodes)):  # what this stage does not need (the head's weights on the first, ...)
        if n.op in ("call_function", "get_attr") and not n.users:
            g.erase_node(n)
    return g


def stages_source(gm: torch.fx.GraphModule, bounds: list[int], title: str) -> str:
    """stages.py for cutting the loop's layers at bounds (the layer each stage starts at, then the end)."""
    top = top_graph(gm)
    run, call, _, _, slots = _loop(top)
    count = len(bounds) - 1
    lists = [k for kind, k, _ in slots if kind == "list"]
    counts = _outputs(top).get("expert_counts")
    if lists and isinstance(counts, torch.fx.Node):
        experts = [b.outputs[lists[0]].meta["val"].shape[0] for b in run.returning]
    elif isinstance(counts, (list, tuple)):  # getitems of the loop's call: each a slot every MoE layer returns
        experts = [b.outputs[slots[c.args[1]][1]].meta["val"].shape[0] for c in counts for b in run.returning]
    else:
        experts = []
    indices = [b.index for b in run.returning]
    classes, used = [], {}
    for s in range(count):
        lo, hi = bounds[s], bounds[s + 1]
        g = _stage_graph(top, s, count, lo, hi)
        src, names = forward_source(g, top.dims)
        used |= names
        src = src.replace(f"self.{run.container}(", f"self.{run.container}[{lo}:{hi}](")
        reads = tuple(n.target for n in g.nodes if n.op == "get_attr")
        first_moe = sum(i < lo for i in indices)
        moe = (first_moe, first_moe + sum(lo <= i < hi for i in indices)) if experts else (0, 0)
        parts = (["what comes before the layers"] if s == 0 else []) + [f"{run.container}.{lo}-{hi - 1}"] + \
            (["what comes after them"] if s == count - 1 else [])
        classes.append("\n".join([
            f"class Stage{s}(Model):",
            f'    """Stage {s} of {count}: {", ".join(parts)}."""',
            "",
            f"    LAYERS = {(run.container, lo, hi)!r}  # the loop's layers it runs: container, first, end",
            f"    READS = {reads!r}  # the parameters and buffers outside the layers it reads",
            f"    MOE_LAYERS = {moe!r}  # the range of the model's MoE layers whose expert counts it keeps",
            "",
            "    " + src.replace("\n", "\n    "),
            "",
        ]))
    head = [line for line in imports(used) if line != "import torch"]
    return "\n".join([
        HEADER.format(title=title, stages=count, bounds=" | ".join(f"{a}-{b - 1}" for a, b in zip(bounds, bounds[1:]))),
        *head,
        "import torch",
        "",
        "from model import Model",
        "",
        f"EXPERTS = {experts!r}  # experts of each MoE layer, in the order of the forward's expert_counts",
        "",
        *("\n" + c for c in classes),
        "",
        f"STAGES = [{', '.join(f'Stage{s}' for s in range(count))}]",
        "",
    ])
