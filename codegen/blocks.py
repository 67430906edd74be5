"""The layers of a flat graph, found again: which nodes belong to which block.

A block is a child of a container (a ModuleList or Sequential: a module path
ending in an index, `h.3`, `model.layers.3`), read from each node's
nn_module_stack and each parameter's dotted name. A block becomes one call,
and the blocks of one container become one loop, when cutting them out keeps
the graph a DAG and (for the loop) every layer takes the same arguments: some
the same for all layers, some carried from the layer before. What a layer
returns beside what it carries is collected per layer; a per-layer value the
model sums in layer order (the MoE losses) is summed by the loop.
"""
import re
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx

aten = torch.ops.aten
LOCAL = "training"  # a get_attr every module has of its own: copied into each block, not passed in
_INDEXED = re.compile(r"^(.+)\.(\d+)$")


@dataclass(eq=False)
class Block:
    path: str  # "h.3"
    container: str  # "h"
    index: int
    kind: str  # the user's class name ("Block")
    nodes: list = field(default_factory=list)
    inputs: list = field(default_factory=list)  # nodes outside it that it reads, in order of first use
    outputs: list = field(default_factory=list)  # its nodes read outside it, in graph order


@dataclass(eq=False)
class Run:
    """The blocks of one container called in a loop."""
    container: str
    blocks: list
    carry: dict  # input slot -> output slot of the layer before (the other slots: the same node for all)
    side: list  # output slots not carried: collected per layer
    returning: list  # the layers that return them (all, or those with the widest output)
    uniform: bool  # every layer returns the same slots
    sums: dict = field(default_factory=dict)  # side slot -> the node that sums it over the layers (replaced)
    skip: set = field(default_factory=set)  # the summing nodes the loop stands for


def _block_of_path(stack: dict) -> tuple[str, str] | None:
    """(path, class name) of the outermost module in the stack that is an indexed child."""
    for path, kind in (stack or {}).values():
        if _INDEXED.match(path):
            return path, str(kind).rsplit(".", 1)[-1].strip("'>")
    return None


def find(gm: torch.fx.GraphModule) -> tuple[list[Block], dict]:
    """The blocks, in graph order, and {node: block} for the nodes inside them."""
    blocks: dict[str, Block] = {}
    of: dict[torch.fx.Node, Block] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        found = _block_of_path(node.meta.get("nn_module_stack"))
        if found is None:
            continue
        path, kind = found
        if path not in blocks:
            container, index = _INDEXED.match(path).groups()
            blocks[path] = Block(path, container, int(index), kind)
        of[node] = blocks[path]
    prefixes = sorted(blocks, key=len, reverse=True)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target != LOCAL:
            owner = next((p for p in prefixes if node.target.startswith(p + ".")), None)
            if owner is not None:
                of[node] = blocks[owner]
    for node in gm.graph.nodes:
        if node in of:
            of[node].nodes.append(node)
    for b in blocks.values():
        inside = set(b.nodes)
        for node in b.nodes:
            for a in node.all_input_nodes:
                if a not in inside and a not in b.inputs and not _is_local(a):
                    b.inputs.append(a)
        outputs = [n for n in b.nodes if any(u not in inside for u in n.users)]
        b.outputs = outputs[-1:] + outputs[:-1]  # what it computes last (the residual stream) first
    return list(blocks.values()), of


def _is_local(node: torch.fx.Node) -> bool:
    return node.op == "get_attr" and node.target == LOCAL


def units(gm: torch.fx.GraphModule, of: dict, runs: list[Run]) -> list | None:
    """The graph's nodes outside blocks, its blocks and its loops in an order that computes it, or None
    when cutting them out would make a cycle."""
    unit_of = dict(of)
    for r in runs:
        for b in r.blocks:
            for n in b.nodes:
                unit_of[n] = r
    pos, g = {}, nx.DiGraph()
    for i, node in enumerate(gm.graph.nodes):
        u = unit_of.get(node, node)
        pos.setdefault(u, i)
        g.add_node(u)
        for a in node.all_input_nodes:
            ua = unit_of.get(a, a)
            if ua is not u and not (_is_local(a) and isinstance(u, (Block, Run))):
                g.add_edge(ua, u)
    if not nx.is_directed_acyclic_graph(g):
        return None
    return list(nx.lexicographical_topological_sort(g, key=lambda u: pos[u]))


def loop(blocks: list[Block], of: dict) -> Run | None:
    """The blocks of one container as a loop, or None when their interfaces differ. Layers may differ in
    what they return beside what they carry (a dense layer among MoE layers returns no losses)."""
    first, n = blocks[0], len(blocks)
    if n < 2 or any(len(b.inputs) != len(first.inputs) for b in blocks):
        return None
    members = set(blocks)
    carry = {}
    for j, a in enumerate(first.inputs):
        if of.get(a) in members:
            return None
        if all(b.inputs[j] is a for b in blocks):
            continue
        ks = {prev.outputs.index(b.inputs[j]) if b.inputs[j] in prev.outputs else None
              for prev, b in zip(blocks, blocks[1:])}
        if len(ks) != 1 or None in ks:
            return None
        carry[j] = ks.pop()
    carried = set(carry.values())
    lengths = {len(b.outputs) for b in blocks}
    if len(lengths) > 1 and (len(lengths) > 2 or min(lengths) != len(carried) or
                             carried != set(range(len(carried)))):
        return None
    width = max(lengths)
    for i, b in enumerate(blocks):
        nxt = blocks[i + 1] if i + 1 < n else None
        for k, out in enumerate(b.outputs):
            readers = {of.get(u) for u in out.users}
            if k in carried and nxt is not None and readers - {nxt, b}:
                return None  # a carried value also read outside the loop
            if k not in carried and readers & (members - {b}):
                return None
    run = Run(first.container, blocks, carry, [k for k in range(width) if k not in carried],
              [b for b in blocks if len(b.outputs) == width], uniform=len(lengths) == 1)
    for k in run.side:
        _find_sum(run, k)
    return run


def _find_sum(run: Run, k: int) -> None:
    """Record the chain add(add(v0, v1), v2)... over the layers' outputs k, if the model reads them
    only through it."""
    values = [b.outputs[k] for b in run.returning]
    inside = {n for b in run.blocks for n in b.nodes}
    total, chain = values[0], []
    for v in values[1:]:
        adds = [u for u in total.users
                if u.target is aten.add.Tensor and u.args == (total, v) and not u.kwargs]
        if len(adds) != 1 or (chain and len(total.users) != 1):
            return
        total = adds[0]
        chain.append(total)
    if any(set(v.users) - inside - set(chain) for v in values if v is not total):
        return
    run.sums[k] = total
    run.skip.update(chain)
