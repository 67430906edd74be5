"""lower_moe: each MoE layer node becomes the moec:: primitive ops.

Matches: call_function nodes whose target is moec.runtime.ops.moe.moe_layer.
Rewrites: each into the primitives moec.runtime.ops.moe.primitives makes
(gate or a hash layer's fixed_gate, route, permute, experts, unpermute; the
capacity from the symbolic token count; expert choice's own sequence), the
layer's outputs taken from them; the graph calls ops only.
Invariant: the graph computes exactly what it computed before (the layer
node is defined as that sequence).
"""
import torch.fx

from moec.runtime.ops.moe import moe_layer, primitives
from moec.passes.base import Pass, PassResult, inherit_provenance


class LowerMoE(Pass):
    name = "lower_moe"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        g = gm.graph
        layers = [n for n in g.nodes if n.op == "call_function" and n.target is moe_layer]
        for node in layers:
            num_experts = node.args[4].meta["val"].shape[0]  # of w1
            with g.inserting_before(node), inherit_provenance(g, node):
                results = primitives(lambda fn, args: g.call_function(fn, args), num_experts, *node.args,
                                     **node.kwargs)
            for user in list(node.users):
                user.replace_all_uses_with(results[user.args[1]])
                g.erase_node(user)
            g.erase_node(node)
        return PassResult(gm, bool(layers))
