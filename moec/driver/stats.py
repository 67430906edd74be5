"""Graph statistics for the IR summary: nodes, parameters total and active per token, MoE layers."""
import operator

import torch
import torch.fx

import moec.runtime.distributed  # noqa: F401  registers the EP ops matched below
from moec.base.graph import get_param
from moec.runtime.ops.moe import expert_choice, moe_layer

EXPERTS = torch.ops.moec.experts.default
EP_EXPERTS = torch.ops.moec.ep_experts.default
EP_ROWS = (operator.getitem, torch.ops.moec.dispatch.default)
DISPATCH_RBD = torch.ops.moec.dispatch_rbd.default


def _expert_nodes(gm):
    """(weight nodes, k, E) for every MoE layer, before or after lowering."""
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is moe_layer:  # (x, logits, bias, hashed, w1, b1, w3, b3, w2, b2)
            ws = [a.meta["val"] for a in n.args[4:10] if a is not None]
            yield ws, n.kwargs["k"], ws[0].shape[0]
        elif n.target is EXPERTS or n.target is EP_EXPERTS:
            perm = n.args[0]  # the permute (reference or generated) that feeds it: its third argument is k
            while isinstance(perm, torch.fx.Node) and perm.target in EP_ROWS:  # expert parallel: through dispatch
                perm = perm.args[0]
            k = perm.args[2] if isinstance(perm, torch.fx.Node) and len(perm.args) > 2 else None
            chosen = _expert_choice(perm)
            if chosen is not None:  # a slot per expert and token, k of them used per token on average
                k = chosen.args[1]
            if isinstance(perm, torch.fx.Node) and perm.target is DISPATCH_RBD:  # (tokens, row_map, offsets, k, ..)
                k = perm.args[3]
            if isinstance(k, int):  # weights' shapes from the parameters: under EP a node sees E/EP experts
                ws = [get_param(gm, a.target) for a in n.args[2:8] if a is not None]
                yield ws, k, ws[0].shape[0]


def _expert_choice(perm):
    """The expert_choice node whose row map a permute reads, or None."""
    if not isinstance(perm, torch.fx.Node) or len(perm.args) < 2 or not isinstance(perm.args[1], torch.fx.Node):
        return None
    rows = perm.args[1]
    if rows.target is operator.getitem and getattr(rows.args[0], "target", None) is expert_choice:
        return rows.args[0]
    return None


def summary(gm: torch.fx.GraphModule) -> dict:
    total = sum(p.numel() for p in gm.parameters())
    inactive, layers = 0, 0
    for weights, k, E in _expert_nodes(gm):
        layers += 1
        inactive += sum(w.numel() for w in weights) * (E - min(k, E)) // E
    return {"nodes": len(gm.graph.nodes), "params": total, "active_params": total - inactive, "moe_layers": layers}
