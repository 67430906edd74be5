"""Graph statistics for the IR summary: nodes, parameters total and active per token, MoE layers."""
import torch
import torch.fx

from moec.moe import moe_layer

EXPERTS = torch.ops.moec.experts.default


def _expert_nodes(gm):
    """(weight nodes, k, E) for every MoE layer, before or after lowering."""
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is moe_layer:
            yield [a for a in n.args[2:8] if a is not None], n.kwargs["k"], n.args[2].meta["val"].shape[0]
        elif n.target is EXPERTS:
            perm = n.args[0]  # the permute (reference or generated) that feeds it: its third argument is k
            k = perm.args[2] if isinstance(perm, torch.fx.Node) and len(perm.args) > 2 else None
            if isinstance(k, int):
                yield [a for a in n.args[2:8] if a is not None], k, n.args[2].meta["val"].shape[0]


def summary(gm: torch.fx.GraphModule) -> dict:
    total = sum(p.numel() for p in gm.parameters())
    inactive, layers = 0, 0
    for weights, k, E in _expert_nodes(gm):
        layers += 1
        inactive += sum(w.meta["val"].numel() for w in weights) * (E - min(k, E)) // E
    return {"nodes": len(gm.graph.nodes), "params": total, "active_params": total - inactive, "moe_layers": layers}
