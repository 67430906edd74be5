"""Emit the compiled model as a readable Python module, and its weights.

model.py reads like the user's model: one class per distinct block (a layer
of a ModuleList, named after the user's class), declared once and built for
every layer with that structure; the layers of a container run in a loop in
a ModuleList subclass; the model's own forward holds what lies outside the
layers. Parameters keep the user's dotted names, so the weights load as
before. Each class declares its parameters and buffers from a table of
shapes. It imports torch and moec.runtime only, plus whatever the graph
calls: generated kernel modules, and, when the torch.fx.symbolic_trace
front-end kept some of the model's own operators or functions opaque, the
model file itself (copied into the build as source/). A graph whose layers
cannot be cut out as calls (a value flowing from a later layer back to an
earlier one) is written as one flat forward. With --recompute the loop calls
each layer through moec.runtime.recompute while the module's RECOMPUTE is
true (a flat forward cannot recompute, and is refused).
"""
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx

from moec.base.errors import MoecError
from moec.codegen import blocks as layers
from moec.codegen.render import forward_source, imports, name_literals

HEADER = '''"""{title}

Written by `moec compile`; see config.json for the options and ir/ for how
each pass got here. Every name below is a parameter or buffer of the model.
"""
'''

KERNEL_LOADER = '''
# generated Triton kernels in kernels/ beside this file; importing them registers their ops
moec.runtime.load_kernels(Path(__file__).parent, KERNELS)
'''

RECOMPUTE_FLAG = '''# --recompute: each layer keeps only its inputs for backward and runs its forward again there
# (moec.runtime.recompute); False keeps every activation instead
RECOMPUTE = True'''

USER_LOADER = '''
# the graph's opaque calls go to the original model file's operators and functions: load it
_spec = importlib.util.spec_from_file_location({name!r}, Path(__file__).parent / {path!r})
_user = sys.modules.get(_spec.name)
if _user is None:
    _user = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_user)
'''

_LAYER_CALL = re.compile(r'getattr\(self\.([\w.]+), "(\d+)"\)')


def _dtype(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def _tables(gm):
    seen, params, tied = {}, {}, {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied[name] = seen[id(p)]
        else:
            seen[id(p)] = name
            params[name] = (tuple(p.shape), _dtype(p))
    buffers = {n: (tuple(b.shape), _dtype(b)) for n, b in gm.named_buffers()}
    return params, buffers, tied


def _table(name, rows: dict, indent="") -> str:
    body = "".join(f"{indent}    {k!r}: {v!r},\n" for k, v in rows.items())
    return f"{indent}{name} = {{\n{body}{indent}}}\n"


def _base(name: str) -> str:
    """A node's name without the counter that made it unique in the whole graph."""
    name = re.sub(r"(_\d+)+$", "", name)
    return re.sub(r"_(default|tensor|scalar)$", "", name) or name


def _camel(path: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in re.split(r"[._]", path) if p)


def _size_names(gm, dims: dict) -> dict:
    """{node: batch or seq} for the sym_size nodes that read the first input's symbolic sizes."""
    first = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    return {n: SIZE_NAMES[dims[str(n.meta.get("val"))]] for n in gm.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int and n.args[0] is first
            and str(n.meta.get("val")) in dims}


def _dims(gm) -> dict:
    """{size symbol: B or T} from the first input's shape, for shape comments and size names."""
    first = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    val = first.meta.get("val") if first is not None else None
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        return {}
    return {str(d): name for d, name in zip(val.shape, "BT") if not str(d).isdigit()}


SIZE_NAMES = {"B": "batch", "T": "seq"}  # fx names variables in snake case


@dataclass(eq=False)
class Emitted:
    """A block class: its name, tables and forward source, and the layers built from it."""
    name: str
    params: dict
    buffers: dict
    forward: str
    args: list
    returns: list
    used: dict  # the globals its forward names
    layers: list = field(default_factory=list)


def _block_graph(b: layers.Block, arg_names: list[str], as_tuple: bool = False) -> torch.fx.Graph:
    g = torch.fx.Graph()
    env, local = {}, []
    for a, name in zip(b.inputs, arg_names):
        env[a] = g.placeholder(name)
        env[a].meta["val"] = a.meta.get("val")

    def get(a):
        if a not in env and layers._is_local(a):
            if not local:
                local.append(g.get_attr(layers.LOCAL))
            return local[0]
        return env[a]

    for n in b.nodes:
        target, name = n.target, _base(n.name)
        if n.op in ("get_attr", "call_module"):
            target = n.target[len(b.path) + 1:]
            name = target.replace(".", "_")
        new = g.create_node(n.op, target, torch.fx.map_arg(n.args, get), torch.fx.map_arg(n.kwargs, get), name)
        new.meta["val"] = n.meta.get("val")
        env[n] = new
    outs = [env[o] for o in b.outputs]
    g.output(outs[0] if len(outs) == 1 and not as_tuple else tuple(outs))
    name_literals(g)
    return g


def _arg_names(b: layers.Block, size_names: dict) -> list[str]:
    names = []
    for j, a in enumerate(b.inputs):
        name = "x" if j == 0 and isinstance(a.meta.get("val"), torch.Tensor) else size_names.get(a, _base(a.name))
        while name in names:
            name += "_"
        names.append(name)
    return names


def _classes(found: list, runs: list, dims: dict, size_names: dict, params: dict, buffers: dict) -> dict:
    """{block: Emitted}, one Emitted per distinct structure, named after the user's class. A layer of a loop
    whose layers return different things returns a tuple, however short."""
    by_key, of_block, counts = {}, {}, {}
    tuples = {b for r in runs if not r.uniform for b in r.blocks}
    for b in found:
        inner = lambda table: {k[len(b.path) + 1:]: v for k, v in table.items() if k.startswith(b.path + ".")}
        p, bu = inner(params), inner(buffers)
        positional = forward_source(_block_graph(b, [f"in{j}" for j in range(len(b.inputs))], b in tuples),
                                    dims)[0]
        key = (positional, repr(p), repr(bu))
        if key not in by_key:
            counts[b.kind] = counts.get(b.kind, 0) + 1
            name = b.kind if counts[b.kind] == 1 else f"{b.kind}{counts[b.kind]}"
            args = _arg_names(b, size_names)
            src, used = forward_source(_block_graph(b, args, b in tuples), dims)
            by_key[key] = Emitted(name, p, bu, src, args, [_base(o.name) for o in b.outputs], used)
        by_key[key].layers.append(b.path)
        of_block[b] = by_key[key]
    return of_block


def _structure(gm):
    """(blocks, {node: block}, runs, order), or no blocks when they cannot be cut out."""
    found, of = layers.find(gm)
    if any(n.op == "call_module" and of.get(n) and not n.target.startswith(of[n].path + ".")
           for n in gm.graph.nodes):
        found, of = [], {}
    by_container = {}
    for b in found:
        by_container.setdefault(b.container, []).append(b)
    runs = [r for bs in by_container.values() if (r := layers.loop(sorted(bs, key=lambda b: b.index), of))]
    for attempt in (runs, []):
        order = layers.units(gm, of, attempt)
        if order is not None:
            return found, of, attempt, order
    return [], {}, [], list(gm.graph.nodes)


def _list_key(gm, values: list) -> str | None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    result = out.args[0]
    if isinstance(result, dict):
        return next((k for k, v in result.items() if isinstance(v, (list, tuple)) and list(v) == values), None)
    return None


def _top(order, returns: dict, dims: dict, size_names: dict):
    """The model's own forward: the nodes outside the layers, a call per layer or loop (returns: what
    each loop returns, from _run_returns)."""
    src, used = forward_source(_top_graph(order, returns, size_names), dims)
    return _LAYER_CALL.sub(r"self.\1[\2]", src), used


def _top_graph(order, returns: dict, size_names: dict) -> torch.fx.Graph:
    top = torch.fx.Graph()
    env, lists = {}, []
    skip = set().union(*(r.skip for r in returns))

    def remap(a):
        if isinstance(a, (list, tuple)):
            for values, node in lists:
                if list(a) == values:
                    return node
            return type(a)(remap(x) for x in a)
        if isinstance(a, dict):
            return {k: remap(v) for k, v in a.items()}
        return env[a] if isinstance(a, torch.fx.Node) else a

    def getitem(call, i, name):
        return top.create_node("call_function", operator.getitem, (call, i), {}, name)

    for u in order:
        if isinstance(u, torch.fx.Node):
            if u in skip:
                continue
            name = u.name if u.op == "placeholder" else size_names.get(u, _base(u.name))
            env[u] = top.create_node(u.op, u.target, remap(u.args), remap(u.kwargs), name)
            env[u].meta["val"] = u.meta.get("val")
        elif isinstance(u, layers.Run):
            call = top.call_module(u.container, tuple(env[a] for a in u.blocks[0].inputs))
            slots = returns[u]
            for i, (kind, k, name) in enumerate(slots):
                node = getitem(call, i, name) if len(slots) > 1 else call  # one slot: returned bare
                if kind == "carry":
                    env[u.blocks[-1].outputs[k]] = node
                elif kind == "sum":
                    env[u.sums[k]] = node
                else:
                    values = [b.outputs[k] for b in u.returning]
                    lists.append((values, node))
                    for j, v in enumerate(values):
                        env[v] = getitem(node, j, _base(v.name))
        else:
            call = top.call_module(u.path, tuple(env[a] for a in u.inputs))
            if len(u.outputs) == 1:
                env[u.outputs[0]] = call
            else:
                for i, o in enumerate(u.outputs):
                    env[o] = getitem(call, i, _base(o.name))
    for n in reversed(list(top.nodes)):  # what the loops made unread (the per-layer items of a summed list)
        if n.op in ("call_function", "get_attr") and not n.users and n.target in (operator.getitem, layers.LOCAL):
            top.erase_node(n)
    name_literals(top)
    return top


@dataclass
class Top:
    """The model's own forward as a graph, with what pipeline stages are cut from: its loops (runs) and what
    each returns (slots: ("carry" | "sum" | "list", output slot, name), in the order the call returns them)."""
    graph: torch.fx.Graph
    runs: list
    returns: dict
    dims: dict


def top_graph(gm) -> Top:
    found, of, runs, order = _structure(gm)
    dims = _dims(gm)
    size_names = _size_names(gm, dims)
    classes = _classes(found, runs, dims, size_names, *_tables(gm)[:2])
    returns = {r: _run_returns(gm, r, classes) for r in runs}
    return Top(_top_graph(order, returns, size_names), runs, returns, dims)


def _run_returns(gm, run: layers.Run, classes: dict) -> list[tuple[str, int, str]]:
    """What a loop returns, in order: ("carry", output slot, name), ("sum", ...), ("list", ...)."""
    args, returns = classes[run.blocks[0]].args, classes[run.returning[0]].returns
    feeds = {k: j for j, k in run.carry.items()}
    out = [("carry", k, args[feeds[k]]) for k in sorted(feeds)]
    for k in run.side:
        if k in run.sums:
            out.append(("sum", k, f"{returns[k]}_sum"))
        else:
            values = [b.outputs[k] for b in run.returning]
            out.append(("list", k, _list_key(gm, values) or f"{returns[k]}s"))
    return out


def _loop_class(run: layers.Run, classes: dict, slots: list, recompute: bool = False) -> tuple[str, str]:
    """(class name, source) of the ModuleList whose forward runs a container's layers in order; slots:
    what it returns, from _run_returns; recompute: call each layer through moec.runtime.recompute when
    the module's RECOMPUTE says so."""
    args, returns = classes[run.blocks[0]].args, classes[run.returning[0]].returns
    name = f"{_camel(run.container)}Stack"
    feeds = {k: j for j, k in run.carry.items()}
    per_layer, taken = [], set(args)
    for k, base in enumerate(returns):
        if k in feeds:
            per_layer.append(args[feeds[k]])
            continue
        while base in taken:
            base += "_"
        taken.add(base)
        per_layer.append(base)
    kinds = sorted({classes[b].name for b in run.blocks})
    lines = [f"class {name}(torch.nn.ModuleList):",
             f'    """{run.container}: {", ".join(kinds)} layers, each fed what the one before returns."""',
             "",
             f"    def forward(self, {', '.join(args)}):"]
    lines += [f"        {n} = []" for kind, _, n in slots if kind == "list"]
    lines += [f"        {n} = None" for kind, _, n in slots if kind == "sum"]
    lines.append("        for layer in self:")
    call = f"layer({', '.join(args)})"
    if recompute:
        call = f"moec.runtime.recompute(layer, {', '.join(args)}) if RECOMPUTE else {call}"
    indent = "            "
    if run.uniform:
        lines.append(f"{indent}{', '.join(per_layer)} = {call}")
    else:  # the layers without side outputs return only what they carry
        carried = per_layer[:len(feeds)]
        lines += [f"{indent}{', '.join(carried)}, *side = {call}", f"{indent}if side:",
                  f"{indent}    {', '.join(per_layer[len(feeds):])}{',' if len(per_layer) - len(feeds) == 1 else ''}"
                  " = side"]
        indent += "    "
    for kind, k, n in slots:
        if kind == "list":
            lines.append(f"{indent}{n}.append({per_layer[k]})")
        elif kind == "sum":
            lines.append(f"{indent}{n} = {per_layer[k]} if {n} is None else {n} + {per_layer[k]}")
    lines.append(f"        return {', '.join(n for _, _, n in slots)}")
    return name, "\n".join(lines) + "\n"


def _build_layers(container: str, paths: list, classes_by_path: dict, stack: str | None) -> str:
    """The statement that builds a container's layers in __init__."""
    names = [classes_by_path[p] for p in paths]
    runs = []
    for n in names:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    cls = stack or "torch.nn.ModuleList"
    if len(runs) == 1:
        body = f"{runs[0][0]}(device) for _ in range({runs[0][1]})"
    elif len(runs) <= 3:
        body = "[" + ", ".join(f"*({n}(device) for _ in range({c}))" for n, c in runs) + "]"
    else:
        kinds = sorted(set(names))
        body = f"[({', '.join(kinds)})[c](device) for c in {tuple(kinds.index(n) for n in names)!r}]"
    return f"self.{container} = {cls}({body})"


def _block_class(e: Emitted) -> str:
    layers_of = ", ".join(e.layers) if len(e.layers) <= 3 else f"{e.layers[0]} ... {e.layers[-1]}"
    return "\n".join([
        f"class {e.name}(torch.nn.Module):",
        f'    """{layers_of}"""',
        "",
        _table("PARAMS", e.params, "    ").rstrip("\n"),
        _table("BUFFERS", e.buffers, "    ").rstrip("\n"),
        "",
        "    def __init__(self, device='cpu'):",
        "        super().__init__()",
        "        moec.runtime.declare(self, self.PARAMS, self.BUFFERS, {}, device)",
        "",
        "    " + e.forward.replace("\n", "\n    "),
        "",
    ])


def _regions(gm, dims: dict) -> dict:
    """{attribute: (class name, source)} for the graphs export keeps as modules: the bodies of
    higher-order calls (a region under autocast(enabled=False) or no_grad), called with their context."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and isinstance(getattr(gm, node.target, None), torch.fx.GraphModule):
            sub = getattr(gm, node.target)
            name = f"{_camel(node.target)}Region"
            src, used = forward_source(sub.graph, dims)
            out[node.target] = (name, "\n".join([
                f"class {name}(torch.nn.Module):",
                '    """A region the model runs in its own autocast or grad mode; the call says which."""',
                "",
                "    " + src.replace("\n", "\n    "),
                "",
            ]), used)
    return out


def model_source(gm: torch.fx.GraphModule, title: str, kernels=(), user: tuple[str, str] | None = None,
                 recompute: bool = False) -> str:
    """`user`: (module name, path in the build) of the model file, for graphs that call into it;
    recompute: the layer loops recompute each layer's activations in backward (--recompute)."""
    params, buffers, tied = _tables(gm)
    dims = _dims(gm)
    found, of, runs, order = _structure(gm)
    if recompute and not runs:
        raise MoecError("--recompute recomputes the layers that model.py runs in a loop, and this model's layers "
                        "could not be cut out as a loop: compile without --recompute, or use "
                        "--recompute-experts")
    size_names = _size_names(gm, dims)
    classes = _classes(found, runs, dims, size_names, params, buffers)
    returns = {r: _run_returns(gm, r, classes) for r in runs}
    forward, used = _top(order, returns, dims, size_names)
    emitted = list(dict.fromkeys(classes[b] for b in found))  # in the order of their first layer
    for e in emitted:
        used |= e.used
    regions = _regions(gm, dims)
    body = [src for _, src, _ in regions.values()]
    for _, _, region_used in regions.values():
        used |= region_used
    body += [_block_class(e) for e in emitted]
    stacks = {}
    for r in runs:
        stacks[r.container], src = _loop_class(r, classes, returns[r], recompute)
        body.append(src)
    inner = tuple(b.path + "." for b in found)
    top_params = {k: v for k, v in params.items() if not k.startswith(inner)}
    top_buffers = {k: v for k, v in buffers.items() if not k.startswith(inner)}
    containers = {}
    for b in sorted(found, key=lambda b: b.index):
        containers.setdefault(b.container, []).append(b.path)
    init = ["class Model(torch.nn.Module):", "    def __init__(self, device='cpu'):", "        super().__init__()"]
    init += [f"        self.{attr} = {name}()" for attr, (name, _, _) in regions.items()]
    made = set()
    for container, paths in containers.items():
        parts = container.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent not in made:
                made.add(parent)
                init.append(f"        self.{parent} = torch.nn.Module()")
        init.append("        " + _build_layers(container, paths, {b.path: classes[b].name for b in found},
                                              stacks.get(container)))
    init.append("        moec.runtime.declare(self, PARAMS, BUFFERS, TIED, device)")
    head = imports(used)
    if kernels or user:  # both load files that sit beside model.py
        head += [*(["import importlib.util", "import sys"] if user else []), "from pathlib import Path"]
    if user:
        head.append(USER_LOADER.format(name=user[0], path=user[1]))
    return "\n".join([
        HEADER.format(title=title),
        *sorted(set(head) - {"import torch"}, key=head.index),
        "import torch",
        "import moec.runtime",
        *(["", f"KERNELS = {list(kernels)!r}", KERNEL_LOADER] if kernels else []),
        *(["", RECOMPUTE_FLAG] if recompute else []),
        "",
        *("\n" + b for b in body),
        "",
        _table("PARAMS", top_params),
        _table("BUFFERS", top_buffers),
        _table("TIED", tied),
        "",
        *init,
        "",
        "    " + forward.replace("\n", "\n    "),
        "",
    ])


def weights(gm: torch.nn.Module) -> dict:
    """What a build stores: every parameter once (tied names share one entry) and every buffer, persistent or
    not, except the experts, which are made at load time (gm.meta["upcycle"]), and instead the dense tensors
    they are made from, once each; all lazily as they are in gm (no copies)."""
    params, buffers, _ = _tables(gm)
    recipe = gm.meta.get("upcycle", {})
    state = dict(gm.named_parameters(remove_duplicate=False)) | dict(gm.named_buffers())
    stored = {n: state[n].detach() for n in [*params, *buffers] if n not in recipe}
    return stored | {n: t.detach() for n, t in gm.meta.get("upcycle_sources", {}).items() if n not in stored}


def write_weights(gm: torch.nn.Module, directory: Path, dtypes: dict | None = None, fetch=None,
                  referenced=frozenset()) -> None:
    """directory/weights.safetensors (weights(gm) but the referenced ones, which the build reads from the
    dense checkpoint; a tensor in dtypes[name] where given: the dtype the dense checkpoint held it in;
    fetch: name -> the value of one gm holds on the meta device, read as it is written) and
    directory/upcycle.json (each expert tensor's recipe)."""
    import json

    from moec.base import safetensors_io
    from moec.runtime.weights import RECIPE, WEIGHTS

    state = weights(gm)
    safetensors_io.save({n: t for n, t in state.items() if n not in referenced}, Path(directory) / WEIGHTS, dtypes,
                        fetch)
    params, buffers, _ = _tables(gm)
    recipe = {"experts": gm.meta.get("upcycle", {}), "sources": sorted(set(state) - set(params) - set(buffers))}
    (Path(directory) / RECIPE).write_text(json.dumps(recipe, indent=1, sort_keys=True) + "\n")


def stored_bytes(gm: torch.nn.Module, dtypes: dict | None = None) -> int:
    dtypes = dtypes or {}
    return sum(t.numel() * dtypes.get(n, t.dtype).itemsize for n, t in weights(gm).items())
