"""insert_collectives: the dispatch/combine all-to-all of expert parallelism.

Matches: call_function nodes targeting moec::experts (as lower_moe wrote
them: x from moec::permute, offsets from moec::route), and calls of
moec.runtime.ops.moe.load_balance_loss.
Rewrites: with EP > 1 (the node's meta["ep_size"] from plan_sharding, else
the pass's option), x and offsets go through moec::dispatch, which hands
experts this rank's rows and local offsets, and the experts' output goes
through moec::combine back to the permute order before unpermute reads it.
Each dispatch/combine gets meta["comm"] = {group, ep, node_size, bytes} and
the same as meta["custom"], which the IR dump prints above the node
("# Annotation: ..."): bytes is what one rank sends to the others when
routing is uniform, N*D*itemsize*(EP-1)/EP. The load-balancing loss reads
moec::balance_counts(counts) (global expert shares) so that data-parallel
ranks optimise the loss of the global batch. Activation checkpointing that
does not repeat the all-to-all is the experts' own recompute=True (from
`--recompute-experts`): they keep the dispatched rows, their input, and
recompute their activations from them in backward.
variant "rbd" dispatches from the tokens before permute (moec::dispatch_rbd,
each token crossing to a node once; permute is then removed) and combines
hierarchically. chunks > 1 (flat only) replaces the three nodes by one moec::ep_experts,
which overlaps each chunk's all-to-all with another chunk's experts (and
always recomputes activations that way).
Invariant: on one process (no group registered) the graph computes what it
computed before; on P ranks it computes what one process computes on the
concatenated batch. Every rank runs this same graph, so the sequence of
collectives is the same on all of them.
"""
import operator

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from moec.base.errors import MoecError
from moec.base.options import Options
from moec.runtime.distributed import ops as _ops, overlap as _overlap, rbd as _rbd  # noqa: F401  registers the ops
from moec.runtime.distributed.params import is_expert
from moec.runtime.ops.moe import load_balance_loss
from moec.passes.base import Pass, PassResult, inherit_provenance

ops = torch.ops.moec


def _bytes(x: torch.fx.Node, ep: int):
    v = x.meta.get("val")
    if v is None:
        return "?"
    rows, D = v.shape
    total = rows * D * v.element_size() * (ep - 1) // ep
    return int(total) if isinstance(total, int) or total.node.is_constant() else str(total)


class InsertCollectives(Pass):
    name = "insert_collectives"

    def __init__(self, options: Options):
        self.o = options

    def _check_weights(self, node: torch.fx.Node) -> None:
        for w in node.args[2:8]:
            if isinstance(w, torch.fx.Node) and not (w.op == "get_attr" and is_expert(w.target)):
                raise MoecError(f"{node.name} reads expert weights {w.name!r} that are not parameters named "
                                "'<layer>.experts.<w1|w3|w2|b1|b3|b2>'; the runtime cannot shard them")

    def _dispatch(self, g, node: torch.fx.Node, x, offsets, ep: int, node_size: int) -> torch.fx.Node:
        if self.o.ep_variant != "rbd":
            return g.call_function(ops.dispatch.default, (x, offsets, ep, node_size))
        if not (isinstance(x, torch.fx.Node) and x.target is ops.permute.default):
            raise MoecError(f"{node.name}: the rbd variant reads the tokens before moec::permute, and {x} is not "
                            "one; run insert_collectives before lower_to_triton")
        tokens, row_map, k = x.args
        return g.call_function(ops.dispatch_rbd.default, (tokens, row_map, offsets, k, ep, node_size))

    def _overlap(self, g, node: torch.fx.Node, ep: int, comm: dict) -> None:
        """experts -> ep_experts (dispatch, experts and combine in overlapped chunks)."""
        with g.inserting_before(node), inherit_provenance(g, node):
            fused = g.call_function(ops.ep_experts.default, (*node.args[:9], ep, self.o.ep_chunks))
            out = g.call_function(operator.getitem, (fused, 0))
        node.replace_all_uses_with(out)
        g.erase_node(node)
        fused.meta["comm"] = comm
        fused.meta["custom"] = {**comm, "chunks": self.o.ep_chunks}

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        g, changed = gm.graph, False
        node_size = self.o.node_size if self.o.ep_variant != "flat" else 0
        for node in [n for n in g.nodes if n.op == "call_function" and n.target is ops.experts.default]:
            ep = node.meta.get("ep_size", self.o.ep)
            if ep == 1:
                continue
            self._check_weights(node)
            x, offsets = node.args[:2]
            E = node.args[2].meta["val"].shape[0]
            if E % ep:
                raise MoecError(f"{node.name} has {E} experts, not divisible by EP={ep}; pick an EP that divides it")
            for w in node.args[2:8]:
                if isinstance(w, torch.fx.Node):  # a rank's view: its E/EP experts (the module keeps all E)
                    w.meta["val"] = w.meta["val"][:E // ep]
            comm = {"group": "ep", "ep": ep, "node_size": node_size, "bytes": _bytes(x, ep)}
            if self.o.ep_chunks > 1:
                self._overlap(g, node, ep, comm)
                changed = True
                continue
            with g.inserting_before(node), inherit_provenance(g, node):
                d = self._dispatch(g, node, x, offsets, ep, node_size)
                rows, local, counts = (g.call_function(operator.getitem, (d, i)) for i in range(3))
                n_rows = g.call_function(torch.ops.aten.sym_size.int, (x, 0))
            node.args = (rows, local, *node.args[2:])  # recompute, if set, stays
            node.meta.pop("val", None)  # its rows are now the dispatched ones
            with g.inserting_after(node), inherit_provenance(g, node):
                c = g.call_function(ops.combine.default, (node, counts, n_rows, ep, node_size))
            node.replace_all_uses_with(c, delete_user_cb=lambda u: u is not c)
            if not x.users:  # rbd reads the tokens, not permute's rows
                g.erase_node(x)
            for n in (d, c):
                n.meta["comm"] = comm
                n.meta["custom"] = dict(comm)
            changed = True
        for node in [n for n in g.nodes if n.op == "call_function" and n.target is load_balance_loss]:
            with g.inserting_before(node), inherit_provenance(g, node):
                shares = g.call_function(ops.balance_counts.default, (node.args[0],))
            node.args = (shares, *node.args[1:])
            shares.meta["custom"] = {"group": "data"}
            changed = True
        mode = gm.meta.get("fake_mode")
        if changed and mode is not None and mode.shape_env is None:
            mode.shape_env = ShapeEnv()  # dispatch's row count is data dependent: an unbacked size
        return PassResult(gm, changed)
