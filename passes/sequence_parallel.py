"""Sequence parallelism on top of tensor_parallel's regions (Megatron's --sequence-parallel).

Matches: the residual stream of [B, S, ...] activations (S the input's sequence length, dim 1) from the
last tensor the first TP region's input comes from that a residual add also reads (P, the embedding) to the
last residual add after the last TP region (Q, the last block's output).
Rewrites: P's users read tensor_parallel.scatter(P, 1) (each TP rank keeps its 1/TP of the sequence) and Q's
users read gather(Q, 1); between them a region's enter becomes enter_sp (all-gather of the tokens) and its
reduce becomes reduce_sp (reduce-scatter over the tokens; an FFN region that reads the tokens flattened,
a shared expert's, gathers and scatters them on dim 0), so the norms, residual adds, router and MoE
layers run on this rank's tokens. Each MoE layer's balance loss reads expert counts summed over the TP group
(tp_sum) and its balance and z losses are averaged over it (tp_mean), as one process computes them.
gm.meta["tp_plan"] gains {name: {"style": "sequence", ...}} for each parameter used only on token shards
(norms, biases after a row-parallel linear, routers, experts): the runtime sums their gradients over "tp".
Invariant: on one process the graph computes what it computed before; what token shards would compute
otherwise (a size of the whole sequence read on a shard, or a shard's size read where all tokens are, a
tensor of the whole sequence mixed with a shard, a parameter used on both) is a MoecError naming the node.
"""
import sympy
import torch
import torch.fx

from moec.base.errors import MoecError
from moec.passes.base import inherit_provenance
from moec.passes.tp_dims import aten
from moec.runtime.distributed import tensor_parallel as tp_ops
from moec.runtime.ops import moe as moe_ops

FLAG = "--sequence-parallel"
LOSSES = {moe_ops.load_balance_loss, moe_ops.z_loss}
REPLICATED = {tp_ops.tp_mean, tp_ops.tp_sum, tp_ops.gather, tp_ops.enter, tp_ops.enter_sp}


def _module(n: torch.fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {"": ("the model", None)}
    return next(reversed(stack.values()))[0] or "the model"


def _symbols(n) -> set:
    v = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
    if isinstance(v, torch.SymInt):
        return set(v.node.expr.free_symbols)
    if isinstance(v, torch.Tensor):
        return set().union(*(s.node.expr.free_symbols for s in v.shape if isinstance(s, torch.SymInt)))
    return set()


def _walk(start, step) -> set:
    seen, todo = set(), list(start)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += step(n)
    return seen


def _insert(g, source, fn, args, users, provenance) -> torch.fx.Node:
    with inherit_provenance(g, provenance):
        with g.inserting_after(source):
            new = g.call_function(fn, args)
    new.meta["val"] = source.meta.get("val")
    for u in users:
        u.replace_input_with(source, new)
    return new


def shard_sequence(gm: torch.fx.GraphModule, enters: list, reduces: list, inside: set, token_wise: set) -> dict:
    """Rewrite gm (see the module docstring); the tp_plan entries of the parameters used on token shards.
    enters: tensor_parallel's enter nodes; reduces: tensor_parallel's reduce nodes; inside: the
    nodes between a region's enter and its reduce; token_wise: the enters and reduces of FFN regions, which
    may gather and scatter the tokens flattened, [B*S, ...] on dim 0, in any order."""
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    idx = next((p for p in g.nodes if p.op == "placeholder" and isinstance(p.meta.get("val"), torch.Tensor)
                and p.meta["val"].dim() >= 2), None)
    seq = idx.meta["val"].shape[1] if idx is not None else None
    if not isinstance(seq, torch.SymInt) or not isinstance(seq.node.expr, sympy.Symbol):
        raise MoecError(f"{FLAG}: the model's input has no sequence dim of symbolic length to split; drop {FLAG}")
    seq = seq.node.expr

    def stream(n) -> bool:
        v = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
        return isinstance(v, torch.Tensor) and v.dim() >= 3 and isinstance(v.shape[1], torch.SymInt) \
            and v.shape[1].node.expr == seq

    residual = [n for n in g.nodes if n.target is aten.add.Tensor and len(n.args) == 2 and all(map(stream, n.args))]
    first = min(enters, key=order.get).args[0]
    before = _walk([first], lambda n: [a for a in n.all_input_nodes if n.op != "placeholder"])
    starts = [a for r in residual for a in r.args if a in before]
    start = max(starts, key=order.get) if starts else first
    after = _walk([max(reduces, key=order.get)], lambda n: list(n.users))
    ends = [r for r in residual if r in after]
    end = max(ends, key=order.get) if ends else max(reduces, key=order.get)
    if not stream(start) or not stream(end):
        raise MoecError(f"{FLAG}: the residual stream at {start.name} and {end.name} is not [batch, sequence, ...]; "
                        f"drop {FLAG}")
    if len(g.find_nodes(op="call_function", target=moe_ops.sequence_balance_loss)):
        raise MoecError(f"{FLAG}: the per-sequence balance loss (--aux-loss-scope sequence) needs each sequence "
                        f"whole, which sequence parallelism splits over the TP ranks; use --aux-loss-scope batch")
    if not end.users:
        raise MoecError(f"{FLAG}: the model returns its residual stream {end.name} unnormalised; drop {FLAG}")
    first_user = min(end.users, key=order.get)
    _insert(g, start, tp_ops.scatter, (start, 1), list(start.users), start)
    _insert(g, end, tp_ops.gather, (end, 1), list(end.users), first_user)
    for n in list(g.nodes):  # the balance and z losses of this rank's tokens, as the TP group's
        if n.target in LOSSES:
            if n.target is moe_ops.load_balance_loss:
                c = n.args[0]
                _insert(g, c, tp_ops.tp_sum, (c,), [n], n)
            mean = _insert(g, n, tp_ops.tp_mean, (n,), list(n.users), n)
            mean._rename(f"{n.target.__name__}_tp")  # the emitted code names each layer's sum after it
    shard, local = set(), set()  # tensors holding this rank's tokens; sizes read off them
    for n in g.nodes:
        ins = [a for a in n.all_input_nodes if a in shard]
        if n.op == "output":
            continue
        if n.target is tp_ops.scatter or n.target is tp_ops.reduce:
            shard.add(n)
        elif ins and n.target not in REPLICATED and n not in inside:
            _check(n, shard, local, seq)
            (shard if isinstance(n.meta.get("val"), (torch.Tensor, tuple, list)) else local).add(n)
        elif n.target not in REPLICATED:
            bad = [a for a in n.all_input_nodes if a in local and seq in _symbols(a)]
            if ins or bad:
                raise MoecError(f"{FLAG}: {n.name} in {_module(n)} reads {(ins or bad)[0].name}, which holds "
                                f"this rank's share of the tokens, where all tokens are; drop {FLAG}")
    def token_dim(n: torch.fx.Node) -> int:
        x = n.args[0]
        if stream(x):
            return 1
        v = x.meta.get("val")
        if n in token_wise and isinstance(v, torch.Tensor) and v.dim() == 2 and seq in _symbols(x) \
                and isinstance(v.shape[0], torch.SymInt) and seq in v.shape[0].node.expr.free_symbols:
            return 0
        raise MoecError(f"{FLAG}: the tensor-parallel region of {_module(n)} reads or writes {x.name}, whose "
                        f"tokens are neither [batch, sequence, ...] nor flattened into an FFN; drop {FLAG}")

    for n in g.nodes:
        if n.target is tp_ops.enter and n.args[0] in shard:
            n.target, n.args = tp_ops.enter_sp, (n.args[0], token_dim(n))
        elif n.target is tp_ops.reduce:
            n.target, n.args = tp_ops.reduce_sp, (n.args[0], token_dim(n))
    out = next(iter(g.find_nodes(op="output")))
    for a in out.all_input_nodes:
        if a in shard and a.target is not aten.detach.default and seq in _symbols(a):
            raise MoecError(f"{FLAG}: the model returns {a.name}, which holds this rank's share of the tokens; "
                            f"drop {FLAG}")
    params = dict(gm.named_parameters(remove_duplicate=False))  # a tied parameter under each of its names
    names, on = {}, {}
    for name, p in params.items():
        names.setdefault(id(p), []).append(name)
    for n in g.nodes:  # a parameter may be read by more than one get_attr node, under more than one name
        if n.op == "get_attr" and n.target in params:
            on.setdefault(id(params[n.target]), set()).update(u in shard or u in local for u in n.users)
    plan = {}
    for key, where in on.items():
        if where == {True, False}:
            first, *tied = names[key]
            raise MoecError(f"{FLAG}: {first}{f' (tied to {tied[0]})' if tied else ''} is used both on this rank's "
                            f"share of the tokens and on all of them; drop {FLAG}")
        if where == {True}:
            plan.update({name: {"style": "sequence", "parts": 1, "bias": None} for name in names[key]})
    return plan


def _check(n: torch.fx.Node, shard: set, local: set, seq) -> None:
    """n computes on this rank's tokens: the tensors of the whole sequence and the sizes it reads must be
    this rank's too."""
    for a in n.all_input_nodes:
        if a in shard or a in local or seq not in _symbols(a):
            continue
        what = "tensor" if isinstance(a.meta.get("val"), torch.Tensor) else "size"
        raise MoecError(f"{FLAG}: {n.name} in {_module(n)} computes on this rank's share of the tokens but reads "
                        f"the {what} {a.name} of the whole sequence; drop {FLAG}")
