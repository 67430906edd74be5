"""ffn_to_moe: sparse upcycling of the FFNs that find_ffn recorded.

Matches: gm.meta["ffns"]. Rewrites FFN i into an MoE layer when
i >= first_dense and (i - first_dense) % moe_every == 0: a router
linear(x, R) [T, E*M], one `moec.runtime.ops.moe.moe_layer` node over E*M experts of
width F/M (granularity M, top K*M), optional shared experts always on, and
adds "aux_loss", "z_loss" and "expert_counts" to the graph's output dict
(and "router_inputs", the routers' inputs [T, D] detached, of the layers with a selection bias).
The pyramid option gives the last few MoE layers another expert count.

Upcycling construction (what keeps the invariant): fine expert b*M+s holds
rows s*F/M:(s+1)*F/M of W1 (and W3) and the matching columns of W2, scaled
by M; router rows are drawn per coarse expert b and repeated M times, so the
M segments of a block always tie and top-(K*M) picks K whole blocks; with
renormalised weights the routed part equals the dense FFN. With S shared
experts (each F/M wide, holding segment i mod M): when M divides S they form
u = S/M dense copies, and shared and routed outputs are scaled by
u/(1+u) and 1/(1+u); otherwise the shared down-projections start at zero.
With --expert-bias-rate a zero buffer router.bias [E*M] steers selection
(train.py moves it). --router-weights scaled takes the chosen experts'
softmax scores times E/K instead of renormalising them: equal to the dense
FFN under a uniform router only. --drop-upcycle R gives each coarse expert
its own random share R of the F units drawn afresh from N(mean, std) of each
dense matrix (Drop-Upcycling).
--upcycle-noise s adds to every entry of a fine expert's weight matrices
Gaussian noise of std s times the dense matrix's std (times the segment's
scale), drawn for that expert alone.
The experts (routed and shared) are not made here: their parameters are
zero-stride placeholders of the right shape, and gm.meta["upcycle"] holds
each one's recipe (its dense
source, segment, scale, seeds; moec.runtime.upcycle) and
gm.meta["upcycle_sources"] the dense tensors, which a build stores once and
train.py upcycles on each rank for the experts that rank holds.
On the meta device with gm.meta["dense_values"] (a checkpoint read when asked), the routers and the
recipe's statistics are made as with real weights: the graph holds meta placeholders and
gm.meta["initial_values"] the values.
--hash-layers: those MoE layers have no router; a buffer router.table
[vocab, K*M] gives each token id K blocks (balanced over the calibration
text's token frequencies) at weight 1/K. --routing expert-choice: each expert
takes its top tokens of the batch (moec.runtime.ops.moe.expert_choice).
Invariant after the pass, with no noise, no capacity, no drop-upcycling,
renormalised weights and top-k or hash routing: the model computes the dense
model's logits.
"""
import operator

import torch
import torch.fx

from moec.base.errors import MoecError
from moec.base.options import Options
from moec.base.graph import delete_unused_attrs, get_param, set_param
from moec.runtime import upcycle
from moec.runtime.ops import elementwise
from moec.runtime.ops.moe import hash_experts, load_balance_loss, moe_layer, sequence_balance_loss, z_loss
from moec.passes.base import Pass, PassResult, inherit_provenance
from moec.passes.routers import balancing_bias, hash_table, router_rows, selection_scores
from moec.runtime.training.data import load_tokens

aten = torch.ops.aten
ACT_NODE = {"gelu": (aten.gelu.default, {}), "gelu_tanh": (aten.gelu.default, {"approximate": "tanh"}),
            "relu": (aten.relu.default, {}), "silu": (aten.silu.default, {})}


BUFFERS = ("router.bias", "router.table")  # state that is not trained by gradients


def _vocab(gm) -> int:
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]["logits"].meta["val"].shape[-1]


def _token_ids(g) -> torch.fx.Node:
    ids = [n for n in g.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
           and not n.meta["val"].is_floating_point()]
    if len(ids) != 1:
        raise MoecError("--hash-layers routes by token id: the model must take one tensor of token ids")
    return ids[0]


def _value(gm, ref) -> torch.Tensor:
    """The dense tensor ref names, read through gm.meta["dense_values"] where the graph holds it on meta."""
    w = ref.fetch(gm)
    if w.is_meta and "dense_values" in gm.meta:
        w = gm.meta["dense_values"](ref.name)
        w = (w.t() if ref.transposed else w)[ref.start:ref.stop]
    return w


class FFNToMoE(Pass):
    name = "ffn_to_moe"
    requires = ("ffns",)
    provides = ("moe_layers", "router_biases")

    def __init__(self, options: Options):
        self.o = options
        self._counted = None

    def _frequency(self) -> torch.Tensor:
        """[vocab] how often each token id occurs in the calibration text, read once for every hash layer."""
        if self._counted is None:
            ids = torch.from_numpy(load_tokens(self.o.calibration_data).astype("int64")) % self._vocab
            self._counted = torch.bincount(ids, minlength=self._vocab)
        return self._counted

    def _weights(self, gm, ffn, E, gen, seed: int, prefix: str, hashed: bool):
        o, M, S = self.o, self.o.granularity, self.o.shared_experts
        W1 = ffn.w1.fetch(gm)
        real = not W1.is_meta or "dense_values" in gm.meta
        device = W1.device if not W1.is_meta or not real else torch.device("cpu")
        u = S // M if S % M == 0 else 0
        x = gm.meta.get("ffn_inputs", {}).get(ffn.module)
        rows = router_rows(E, W1.shape[1], gen, o.router_init, x) if real and not hashed else None
        if hashed:  # no router: a fixed table of K whole blocks per token id
            frequency = self._frequency() if real else None
            w = {"router.table": hash_table(self._vocab, E, o.topk, M, gen, device, frequency)}
        else:
            w = {"router.weight": W1.new_empty(E * M, W1.shape[1]) if rows is None
                 else rows.to(device, W1.dtype).repeat_interleave(M, 0)}
        if o.expert_bias_rate > 0 and o.routing == "topk" and not hashed:  # the layers a router's top-k routes
            w["router.bias"] = torch.zeros(E * M, dtype=torch.float32, device=device)
            if rows is not None and x is not None:
                # the selection score of a fine expert: its block's softmax share split M ways, or the sigmoid
                per_fine = M if o.router == "softmax" else 1
                coarse = selection_scores(x @ rows.t(), o.router)
                w["router.bias"] = (balancing_bias(coarse, o.topk) / per_fine).repeat_interleave(M)
        w.update(self._made_at_load(gm, ffn, prefix, "experts", E, seed, u))
        if S:  # shared expert i holds segment i mod M
            w.update(self._made_at_load(gm, ffn, prefix, "shared", E, seed, u, [i % M for i in range(S)]))
        return w

    def _made_at_load(self, gm, ffn, prefix: str, group: str, E: int, seed: int, u: int, segments=None) -> dict:
        """Placeholders of the expert (or shared-expert) tensors (zero-stride: no memory) and, in
        gm.meta["upcycle"], the recipe that makes each from its dense source at load time
        (moec.runtime.upcycle)."""
        o, M = self.o, self.o.granularity
        out = {}
        for role, ref in (("w1", ffn.w1), ("b1", ffn.b1), ("w3", ffn.w3), ("b3", ffn.b3), ("w2", ffn.w2),
                          ("b2", ffn.b2)):
            name = f"{group}.{role}"
            if ref is None:
                out[name] = None
                continue
            source = get_param(gm, ref.name)
            dense = _value(gm, ref)  # [F, D], [F], [D, F] or [D]
            F = dense.shape[-1] if role == "w2" else dense.shape[0]
            if segments is None:
                scale = M / (1 + u) if role == "w2" else 1 / (1 + u) if role == "b2" else 1.0
                shape = {"w2": (E * M, dense.shape[0], F // M), "b2": (E * M, *dense.shape)}.get(
                    role, (E * M, F // M, *dense.shape[1:]))
            else:  # the shared outputs weigh u/(1+u); without whole dense copies (u=0) they start at zero
                scale = (1 / (1 + u) if u else 0.0) if role == "w2" else u / (1 + u) if role == "b2" else 1.0
                width = len(segments) * F // M
                shape = {"w2": (dense.shape[0], width), "b2": tuple(dense.shape)}.get(role, (width, *dense.shape[1:]))
            routed = segments is None and role != "b2"
            mean = std = None
            if routed and not dense.is_meta:
                mean, std = dense.float().mean().item(), dense.float().std().item()
            noisy = routed and o.upcycle_noise and role in ("w1", "w3", "w2") and std is not None
            gm.meta.setdefault("upcycle", {})[f"{prefix}.{name}"] = upcycle.entry(
                ref.name, [ref.start, ref.stop], ref.transposed, role, E, M, scale, seed,
                round(o.drop_upcycle * F) if routed else 0, mean, std,
                o.upcycle_noise * std * scale if noisy else 0.0, segments)
            gm.meta.setdefault("upcycle_sources", {})[ref.name] = source
            out[name] = source.new_zeros((), dtype=source.dtype).expand(shape)
        return out

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        o, g = self.o, gm.graph
        ffns = gm.meta["ffns"]
        for f in ffns:
            o.check_ffn_width(f.w1.fetch(gm).shape[0])
        layers = o.moe_layer_indices(len(ffns))
        if not layers:
            raise MoecError(f"ffn_to_moe: --first-dense {o.first_dense} leaves no FFN of {len(ffns)} to convert")
        if o.hash_layers and max(o.hash_layers) >= len(layers):
            raise MoecError(f"--hash-layers {max(o.hash_layers)}: the model has {len(layers)} MoE layers, "
                            f"numbered from 0")
        self._vocab, self._counted = _vocab(gm) if o.hash_layers else 0, None
        pyramid_from = len(layers) - o.pyramid[1] if o.pyramid else len(layers)
        stats, prefixes = [], []
        token_ids = _token_ids(g) if o.hash_layers else None
        for j, i in enumerate(layers):
            ffn = ffns[i]
            E = o.pyramid[0] if j >= pyramid_from else o.experts
            seed = o.seed * 1000003 + i
            gen = torch.Generator().manual_seed(seed)
            prefix = f"{ffn.module}.moe" if ffn.module else f"moe{i}"
            hashed = j in o.hash_layers
            weights = {n: t for n, t in self._weights(gm, ffn, E, gen, seed, prefix, hashed).items() if t is not None}
            prefixes.append(prefix if "router.bias" in weights else None)
            for name, t in weights.items():
                made_at_load = name.startswith(("experts.", "shared."))
                if not made_at_load and t.device != get_param(gm, ffn.w1.name).device:  # made for a meta graph
                    gm.meta.setdefault("initial_values", {})[f"{prefix}.{name}"] = t
                    t = t.to("meta")
                set_param(gm, f"{prefix}.{name}", t if made_at_load else t.detach().clone(), buffer=name in BUFFERS)
            with g.inserting_before(ffn.out), inherit_provenance(g, ffn.out, ffn.module):
                stats.append(self._rewrite(g, ffn, prefix, set(weights), E, token_ids if hashed else None))
        with inherit_provenance(g, None):
            self._outputs(g, stats)
        g.eliminate_dead_code()
        delete_unused_attrs(gm)
        gm.meta["moe_layers"] = [ffns[i].module for i in layers]
        # in layer order, the order of the forward's expert_counts: train.py's balancer pairs them
        gm.meta["router_biases"] = [p and f"{p}.router.bias" for p in prefixes]  # None: a layer without
        return PassResult(gm, True)

    def warnings(self, gm) -> list[str]:
        if self.o.routing != "expert-choice":
            return []
        return ["expert-choice routing: a token's experts depend on the other tokens of its batch, later ones of "
                "its own sequence included, so training sees the future through the routing (see the README)"]

    def _rewrite(self, g, ffn, prefix, present, E, token_ids):
        o, M = self.o, self.o.granularity
        attr = lambda name: g.get_attr(f"{prefix}.{name}") if name in present else None
        x = ffn.x
        shape = x.meta["val"].shape
        xf = g.call_function(aten.reshape.default, (x, [-1, shape[-1]]))  # [T, D]
        if token_ids is None:
            logits, hashed = g.call_function(aten.linear.default, (xf, attr("router.weight"))), None  # [T, E*M]
        else:
            logits, hashed = None, g.call_function(hash_experts, (attr("router.table"), token_ids))  # [T, K*M]
        w = [attr(f"experts.{n}") for n in ("w1", "b1", "w3", "b3", "w2", "b2")]
        scaled = o.router_weights == "scaled"  # softmax over E*M, K*M picks: uniform weights sum to K/E
        moe = g.call_function(moe_layer, (xf, logits, attr("router.bias"), hashed, *w), dict(
            k=o.topk * M, score=o.router, renorm=not scaled, weight_scale=E / o.topk if scaled else 1,
            capacity_factor=o.capacity_factor, activation=ffn.activation, recompute=o.recompute_experts,
            force_balance=o.force_balance, routing=o.routing))
        out, counts, probs_sum, zsum, indices = (g.call_function(operator.getitem, (moe, i)) for i in range(5))
        # what the router scored, for train.py's refit of the bias to the updated router at the step's end
        # (after counts, so a loop of layers returns the counts first)
        seen = g.call_function(aten.detach.default, (xf,)) if "router.bias" in present else None
        if o.shared_experts:
            out = g.call_function(aten.add.Tensor, (out, self._shared(g, xf, ffn.activation, attr)))
        sizes = [g.call_function(aten.sym_size.int, (x, i)) for i in range(len(shape) - 1)]  # any batch, seq
        y = g.call_function(aten.reshape.default, (out, [*sizes, shape[-1]]))
        ffn.out.replace_all_uses_with(y)
        # the layer's own losses belong to the layer: an emitted block computes them, the model sums them
        k = o.topk * M
        if o.aux_loss_scope == "sequence" and token_ids is None:
            if len(shape) != 3:
                raise MoecError(f"--aux-loss-scope sequence: {ffn.module or 'an FFN'} takes inputs of shape "
                                f"{list(shape)}, not [batch, seq, hidden]; use --aux-loss-scope batch")
            lb = g.call_function(sequence_balance_loss, (logits, indices, sizes[0], o.router))
        else:
            lb = g.call_function(load_balance_loss, (counts, probs_sum, k))
        return counts, lb, g.call_function(z_loss, (zsum, counts, k)), seen

    @staticmethod
    def _shared(g, xf, activation, attr):
        linear = lambda w: g.call_function(aten.linear.default, (xf, attr(f"shared.{w}"), attr(f"shared.b{w[1]}")))
        h1, h3 = linear("w1"), None if attr("shared.w3") is None else linear("w3")
        if elementwise.is_expression(activation):
            h = elementwise.evaluate(activation, h1, h3, call=lambda op, args, kwargs: g.call_function(op, args, kwargs))
        else:
            op, kw = ACT_NODE[activation]
            h = g.call_function(op, (h1,), kw)
            h = h if h3 is None else g.call_function(aten.mul.Tensor, (h, h3))
        return g.call_function(aten.linear.default, (h, attr("shared.w2"), attr("shared.b2")))

    def _outputs(self, g, stats):
        out = next(n for n in g.nodes if n.op == "output")
        with g.inserting_before(out):
            aux = g.call_function(aten.mul.Tensor, (_sum(g, [lb for _, lb, _, _ in stats]), self.o.aux_loss))
            zl = g.call_function(aten.mul.Tensor, (_sum(g, [z for _, _, z, _ in stats]), self.o.z_loss))
        result = dict(out.args[0])
        result.update(aux_loss=aux, z_loss=zl, expert_counts=[c for c, _, _, _ in stats])
        seen = [s for _, _, _, s in stats if s is not None]  # in the order of the layers that have a bias
        if seen:
            result["router_inputs"] = seen
        out.args = (result,)


def _sum(g, nodes):
    total = nodes[0]
    for n in nodes[1:]:
        total = g.call_function(aten.add.Tensor, (total, n))
    return total
