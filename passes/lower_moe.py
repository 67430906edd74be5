"""lower_moe: each MoE layer node becomes the moec:: primitive ops.

Matches: call_function nodes whose target is moec.runtime.ops.moe.moe_layer.
Rewrites: gate (its selection bias, --force-balance's dealt indices, the
gate weights' scale; a hash layer's fixed_gate) -> route -> permute -> experts
-> unpermute, or for expert-choice routing expert_choice -> permute -> experts
-> unpermute with a slot per expert and token; the capacity
(when a capacity factor is set) computed from the symbolic token count, and
the layer's outputs taken from the primitives; the graph calls ops only.
Invariant: the graph computes exactly what it computed before (the layer
node is defined as that sequence).
"""
import operator

import torch
import torch.fx

from moec.runtime.ops.moe import balanced_indices, capacity, expert_choice, fixed_gate, moe_layer
from moec.passes.base import Pass, PassResult, inherit_provenance

ops = torch.ops.moec


class LowerMoE(Pass):
    name = "lower_moe"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        g = gm.graph
        layers = [n for n in g.nodes if n.op == "call_function" and n.target is moe_layer]
        for node in layers:
            x, logits, bias, hashed, w1, b1, w3, b3, w2, b2 = node.args
            kw = node.kwargs
            k = kw["k"]
            num_experts = w1.meta["val"].shape[0]
            with g.inserting_before(node), inherit_provenance(g, node):
                if kw.get("routing") == "expert-choice":
                    chosen = g.call_function(expert_choice, (logits, k, kw["capacity_factor"]))
                    weights, counts, probs_sum, zsum, row_map, offsets = (
                        g.call_function(operator.getitem, (chosen, i)) for i in range(6))
                    indices, k = None, num_experts  # every token has a slot per expert, most of them unused
                else:
                    weights, indices, counts, probs_sum, zsum, row_map, offsets = self._top_k(g, node, num_experts)
                y = g.call_function(ops.permute.default, (x, row_map, k))
                h = g.call_function(ops.experts.default, (y, offsets, w1, b1, w3, b3, w2, b2, kw["activation"],
                                                          kw.get("recompute", False)))
                out = g.call_function(ops.unpermute.default, (h, row_map, weights))
            results = (out, counts, probs_sum, zsum, indices)
            for user in list(node.users):
                user.replace_all_uses_with(results[user.args[1]])
                g.erase_node(user)
            g.erase_node(node)
        return PassResult(gm, bool(layers))

    @staticmethod
    def _top_k(g, node, num_experts):
        """Each token's k experts (from the gate, or a hash layer's table), then their slots' rows."""
        x, logits, bias, hashed = node.args[:4]
        kw = node.kwargs
        k = kw["k"]
        if hashed is not None:
            gate = g.call_function(fixed_gate, (hashed, num_experts))
        else:
            gate = g.call_function(ops.gate.default, (logits, k, kw["score"], kw["renorm"], bias, 1, 1))
        weights, indices, counts, probs_sum, zsum = (g.call_function(operator.getitem, (gate, i)) for i in range(5))
        if kw.get("force_balance"):
            forced = g.call_function(balanced_indices, (indices, num_experts))
            indices, counts = (g.call_function(operator.getitem, (forced, i)) for i in range(2))
        if kw["weight_scale"] != 1:
            weights = g.call_function(torch.ops.aten.mul.Tensor, (weights, kw["weight_scale"]))
        cap = 0
        if kw["capacity_factor"] > 0:
            tokens = g.call_function(torch.ops.aten.sym_size.int, (x, 0))
            cap = g.call_function(capacity, (tokens, k, num_experts, kw["capacity_factor"]))
        route = g.call_function(ops.route.default, (indices, num_experts, cap))
        row_map, offsets = (g.call_function(operator.getitem, (route, i)) for i in range(2))
        return weights, indices, counts, probs_sum, zsum, row_map, offsets
