"""tensor_parallel: split attention, dense FFNs and shared experts over the TP ranks (Megatron's layout).

Matches: each aten.scaled_dot_product_attention (the aten.linear nodes its q, k and v come from are
column-parallel, the linear its output reaches is row-parallel); the FFNs find_ffn recorded that stayed
dense (up and gate column-parallel, down row-parallel); the shared experts of MoE layers (shared.w1 and
w3 column-parallel, w2 row-parallel). The router and the routed experts are left alone: every TP rank
routes the same tokens, and the experts run under expert parallelism.
Rewrites: a column-parallel linear reads its input through moec.runtime.distributed.tensor_parallel.enter;
a row-parallel one drops its bias, its output goes through tensor_parallel.reduce and the bias is added
after. Between them, a view, reshape or expand gives the split dimension (heads, or the features they
come from) as -1, and a split of it into equal pieces (a fused q/k/v projection) becomes a chunk: the
code reads each rank's local sizes (tp_dims follows the split dimension there).
gm.meta["tp_plan"] = {weight: {"style": "colwise" | "rowwise", "bias": name or None, "parts": equal pieces
of a fused output}}, which config.json carries to the runtime. With sequence_parallel, sequence_parallel.py
then shards the tokens between the regions (its entries have style "sequence").
Invariant: on one process (no "tp" group) the graph computes what it computed before; every split
dimension (heads included) divides by TP, else a MoecError names the layer.
"""
import torch
import torch.fx

from moec.base.errors import MoecError
from moec.passes.base import Pass, PassResult, inherit_provenance
from moec.passes.sequence_parallel import shard_sequence
from moec.passes.tp_dims import LINEAR, SDPA, aten, follow
from moec.runtime.distributed import tensor_parallel as tp_ops

SHARED = {"w1": "colwise", "w3": "colwise", "w2": "rowwise"}
DROPOUTS = {aten.dropout.default, aten.native_dropout.default}


def _tensor(n) -> bool:
    """A node holding tensors (a split's pieces too), not a size."""
    return isinstance(n, torch.fx.Node) and isinstance(n.meta.get("val"), (torch.Tensor, tuple, list))


def _weight(linear: torch.fx.Node) -> str | None:
    w = linear.args[1]
    return w.target if isinstance(w, torch.fx.Node) and w.op == "get_attr" else None


class TensorParallel(Pass):
    name = "tensor_parallel"
    requires = ("ffns",)

    def __init__(self, tp: int, sequence_parallel: bool = False):
        self.tp, self.sequence_parallel = tp, sequence_parallel

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        self.enters, self.reduces, self.inside, self.token_wise = [], [], set(), set()  # for sequence parallelism
        self._check_dropout(gm)
        linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is LINEAR and _weight(n)]
        regions = [self._attention(a) for a in gm.graph.nodes if a.op == "call_function" and a.target is SDPA]
        if not regions:
            raise MoecError(f"--tp {self.tp}: found no attention (torch's scaled_dot_product_attention) to split; "
                            f"use --tp 1")
        moe = set(gm.meta.get("moe_layers", ()))
        for ffn in gm.meta["ffns"]:
            if ffn.module not in moe:
                by = {_weight(n): n for n in linears}
                ups = list(dict.fromkeys(by.get(w.name) for w in (ffn.w1, ffn.w3) if w is not None))
                if None in ups or by.get(ffn.w2.name) is None:
                    raise MoecError(f"--tp {self.tp}: the FFN {ffn.module} does not use aten.linear projections, "
                                    f"which tensor parallelism splits; use --tp 1")
                regions.append((ffn.module, ups, by[ffn.w2.name]))
        shared = {}
        for n in linears:
            *path, leaf = _weight(n).split(".")
            if len(path) > 1 and path[-1] == "shared" and leaf in SHARED:
                shared.setdefault(".".join(path), {})[leaf] = n
        for module, found in shared.items():
            regions.append((module, [found[w] for w in ("w1", "w3") if w in found], found["w2"]))
        plan = {}
        for module, cols, row in regions:
            plan.update(self._split(gm, module, cols, row))
        if self.sequence_parallel:
            plan.update(shard_sequence(gm, self.enters, self.reduces, self.inside, self.token_wise))
        gm.meta["tp_plan"] = plan
        return PassResult(gm, True)

    def _check_dropout(self, gm: torch.fx.GraphModule) -> None:
        """Every rank of a TP group draws from the same seed, and a rank's draws on its heads advance its
        generator by its share: a dropout after one would mask the replicated activations differently."""
        for n in gm.graph.nodes:
            p = (n.args[1] if len(n.args) > 1 else n.kwargs.get("p")) if n.target in DROPOUTS else \
                n.kwargs.get("dropout_p", n.args[4] if len(n.args) > 4 else 0.0) if n.target is SDPA else 0.0
            if p:
                raise MoecError(f"--tp {self.tp}: {n.name} drops out with p={p}, which the ranks of a TP group would "
                                f"draw differently; build the model with dropout 0, or use --tp 1")

    def _attention(self, sdpa: torch.fx.Node):
        """(module, column-parallel linears feeding q, k, v, the row-parallel linear the output reaches)."""
        module = next(reversed(sdpa.meta.get("nn_module_stack", {"": ("attention", None)}).values()))[0]
        cols, todo, seen = [], list(sdpa.args[:3]), set()
        while todo:
            n = todo.pop()
            if not _tensor(n) or n in seen or n.op != "call_function":
                continue
            seen.add(n)
            if n.target is LINEAR:
                cols.append(n)
            else:
                todo += [a for a in n.all_input_nodes if _tensor(a)]
        rows, todo, seen = [], [sdpa], set()
        while todo:
            n = todo.pop()
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if u.target is LINEAR and u.args[0] is n:
                    rows.append(u)
                elif u.op == "call_function":
                    todo.append(u)
        heads = sdpa.args[0].meta["val"].shape[1], sdpa.args[1].meta["val"].shape[1]
        if len(rows) != 1 or not cols or any(not _weight(c) for c in cols + rows):
            raise MoecError(f"--tp {self.tp}: the attention of {module} does not read q/k/v from linear "
                            f"projections and write through one output projection; use --tp 1")
        if any(h % self.tp for h in heads):
            raise MoecError(f"--tp {self.tp}: the attention of {module} has {heads[0]} query and {heads[1]} "
                            f"key/value heads, which TP={self.tp} must divide; use a --tp that divides them")
        return module, list(dict.fromkeys(sorted(cols, key=lambda c: c.name))), rows[0]

    def _split(self, gm, module: str, cols: list, row: torch.fx.Node) -> dict:
        """Rewrite one region (see the module docstring); its tp_plan entries."""
        g = gm.graph
        where = {c: c.meta["val"].dim() - 1 for c in cols}  # node -> which of its dims is split over TP ranks
        parts = {c: 1 for c in cols}
        order = {n: i for i, n in enumerate(g.nodes)}
        todo = sorted({u for c in cols for u in c.users}, key=order.get)
        while todo:
            n = todo.pop(0)
            if n is row or n in where or n.target is aten.sym_size.int:  # a size read is the local one
                continue
            if n.op != "call_function":
                raise MoecError(f"--tp {self.tp}: in {module}, {n.name} reads the split activations outside the "
                                f"attention or FFN; use --tp 1")
            where[n] = follow(n, where, module, parts, self.tp)
            todo = sorted(set(todo) | set(n.users), key=order.get)
        if row.args[0] not in where:
            raise MoecError(f"--tp {self.tp}: the output projection of {module} does not read what its input "
                            f"projections computed; use --tp 1")
        plan = {}
        for c in cols:
            w = c.args[1].meta["val"]
            if w.shape[0] % (parts[c] * self.tp):
                raise MoecError(f"--tp {self.tp}: {_weight(c)} has {w.shape[0]} output features in {parts[c]} "
                                f"parts, which TP={self.tp} must divide; use a --tp that divides them")
            plan[_weight(c)] = {"style": "colwise", "parts": parts[c], "bias": self._bias(c)}
        inputs = dict.fromkeys(c.args[0] for c in cols)
        for x in inputs:
            with inherit_provenance(g, x):
                with g.inserting_after(x):
                    entered = g.call_function(tp_ops.enter, (x,))
            entered.meta["val"] = x.meta.get("val")
            self.enters.append(entered)
            for c in cols:
                if c.args[0] is x:
                    c.update_arg(0, entered)
        plan[_weight(row)] = {"style": "rowwise", "parts": 1, "bias": self._bias(row)}
        if row.args[1].meta["val"].shape[1] % self.tp:
            raise MoecError(f"--tp {self.tp}: {_weight(row)} has input features TP={self.tp} does not divide")
        bias = row.args[2] if len(row.args) > 2 else row.kwargs.get("bias")
        with inherit_provenance(g, row):
            with g.inserting_after(row):
                summed = g.call_function(tp_ops.reduce, (row,))
            summed.meta["val"] = row.meta.get("val")
            row.replace_all_uses_with(summed, delete_user_cb=lambda u: u is not summed)
            if bias is not None:
                row.args, row.kwargs = row.args[:2], {}
                with g.inserting_after(summed):
                    added = g.call_function(aten.add.Tensor, (summed, bias))
                added.meta["val"] = row.meta.get("val")
                summed.replace_all_uses_with(added, delete_user_cb=lambda u: u is not added)
        self.reduces.append(summed)
        self.inside |= set(where) | {row}
        if not any(n.target is SDPA for n in where):  # an FFN: each token on its own
            self.token_wise |= {summed, *self.enters[-len(inputs):]}
        return plan

    @staticmethod
    def _bias(linear: torch.fx.Node) -> str | None:
        b = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
        return b.target if isinstance(b, torch.fx.Node) and b.op == "get_attr" else None

    def report(self, gm: torch.fx.GraphModule) -> list[str]:
        plan = gm.meta.get("tp_plan", {})
        return [f"TP={self.tp}: {how['style']} {w}" + (f" ({how['parts']} parts)" if how["parts"] > 1 else "")
                for w, how in plan.items() if how["style"] != "sequence"] + \
            ([f"TP={self.tp}: sequence parallel, gradients summed over TP: " + ", ".join(sequence)]
             if (sequence := [w for w, how in plan.items() if how["style"] == "sequence"]) else [])
