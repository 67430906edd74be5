"""tensor_parallel on attention blocks (GPT's fused q/k/v, Llama's grouped heads with rotary embedding) and an
FFN: on one process the graph computes what it did; each TP rank's code, run on its slices of the weights,
gives partial outputs whose sum is the whole (the sizes it reads are the local ones), also for fewer tokens
than TP ranks; what it cannot split
is refused in one line. With sequence parallelism: where the scatter, gathers and reduce-scatters go (in the
graph and in the emitted model.py), what would compute otherwise on token shards refused in one line, and a
sequence length TP does not divide refused in one line at run time."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moec.base.errors import MoecError
from moec.driver.capture import capture
from moec.passes.tensor_parallel import TensorParallel
from moec.runtime.distributed import tensor_parallel
from tests.models import run

D = 32


class FusedAttention(nn.Module):  # GPT's
    def __init__(self, heads=4):
        super().__init__()
        self.heads, self.c_attn, self.c_proj = heads, nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (t.view(B, S, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, S, D))


class GroupedAttention(nn.Module):  # Llama's: 4 query heads, 2 key/value heads, rotary embedding
    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wv = nn.Linear(D, D, bias=False), nn.Linear(D, D // 2, bias=False), \
            nn.Linear(D, D // 2, bias=False)
        self.wo = nn.Linear(D, D, bias=False)
        self.register_buffer("cos", torch.randn(64, 4))

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.wq(x).view(B, S, 4, 8), self.wk(x).view(B, S, 2, 8), self.wv(x).view(B, S, 2, 8)
        cos = self.cos[:S, None, :]
        q, k = (torch.stack((t[..., 0::2] * cos, t[..., 1::2] * cos), dim=-1).flatten(-2) for t in (q, k))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))


def _split(model, tp=2):
    torch.manual_seed(0)
    x = torch.randn(2, 5, D)
    gm = capture(model, (x,))
    gm.meta["ffns"] = []
    before = _tensor(gm(x))
    result = run(gm, TensorParallel(tp))
    return result.graph_module, x, before


def _tensor(out):
    return out if torch.is_tensor(out) else next(iter(out.values()))


@pytest.mark.parametrize("model,parts", [(FusedAttention(), {"c_attn.weight": 3}),
                                         (GroupedAttention(), {"wq.weight": 1, "wk.weight": 1, "wv.weight": 1})])
def test_each_rank_computes_its_heads_and_the_sum_is_the_whole(model, parts, monkeypatch):
    gm, x, before = _split(model)
    gm.graph.lint()
    torch.testing.assert_close(_tensor(gm(x)), before, rtol=0, atol=0)  # one process: what it computed before
    plan = gm.meta["tp_plan"]
    out = next(w for w, how in plan.items() if how["style"] == "rowwise")
    assert {w: how["parts"] for w, how in plan.items() if how["style"] == "colwise"} == parts
    full = {n: p.detach().clone() for n, p in gm.named_parameters()}
    bias = full.get(plan[out]["bias"]) if plan[out]["bias"] else None
    one = x[:1, :1]  # fewer tokens than TP ranks: each rank holds them all
    whole = [before, _tensor(gm(one))]
    partial = [[], []]
    for rank in range(2):  # reduce() is the identity here: each rank's output before the sum over TP ranks
        for name, how in plan.items():
            for n, is_bias in ((name, False), (how["bias"], True)):
                if n is not None and not (is_bias and how["style"] == "rowwise"):
                    local = tensor_parallel.local_slice(full[n], how["style"], how["parts"], 2, rank, is_bias)
                    gm.get_parameter(n).data = local
        for i, inputs in enumerate((x, one)):
            y = _tensor(gm(inputs))
            partial[i].append(y if bias is None else y - bias)
    for parts_of, expected in zip(partial, whole):
        torch.testing.assert_close(sum(parts_of) + (0 if bias is None else bias), expected, rtol=1e-5, atol=1e-6)


def test_heads_that_tp_does_not_divide_are_refused():
    with pytest.raises(MoecError, match=r"^tensor_parallel: --tp 2: the attention of .* has 1 query and 1 "
                                        r"key/value heads, which TP=2 must divide"):
        _split(FusedAttention(heads=1))


class NormedAcrossHeads(FusedAttention):  # OLMo2's: q and k normalised over all heads' features
    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)
        q, k, v = (t.view(B, S, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        return self.c_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, D))


class WeightedAcrossHeads(FusedAttention):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(D))

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (t.view(B, S, self.heads, D // self.heads).transpose(1, 2) for t in (q * self.scale, k, v))
        return self.c_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, D))


@pytest.mark.parametrize("model,message", [(NormedAcrossHeads(), r"mean \(aten.mean.dim\) works across the heads"),
                                           (WeightedAcrossHeads(), "combines the split activations with .*, which "
                                                                   "spans all heads")])
def test_what_works_across_the_heads_is_refused(model, message):
    with pytest.raises(MoecError, match=message):
        _split(model)


def test_attention_that_does_not_project_with_linears_is_refused():
    class Bare(nn.Module):
        def forward(self, x):
            q = x.view(2, 5, 4, 8).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(2, 5, D)

    with pytest.raises(MoecError, match="does not read q/k/v from linear projections"):
        _split(Bare())


class Tiny(nn.Module):  # GPT's layout: embedding, blocks of norm -> attention -> residual add, final norm, head
    def __init__(self, blocks=2, positions=False, shared_norm=False):
        super().__init__()
        self.wte, self.head, self.ln_f = nn.Embedding(64, D), nn.Linear(D, 64, bias=False), nn.LayerNorm(D)
        self.ln = nn.ModuleList(nn.LayerNorm(D) for _ in range(blocks))
        if shared_norm:
            self.ln_f = self.ln[0]
        self.attn = nn.ModuleList(FusedAttention() for _ in range(blocks))
        self.pos = nn.Parameter(torch.randn(16, D)) if positions else None

    def forward(self, idx):
        x = self.wte(idx)
        for i, (ln, attn) in enumerate(zip(self.ln, self.attn)):
            x = x + attn(ln(x))
            if i == 0 and self.pos is not None:  # a tensor of the whole sequence, added to the residual stream
                x = x + self.pos[:idx.shape[1]]
        return self.head(self.ln_f(x))


def _sequence_parallel(model):
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (2, 6))
    gm = capture(model, (idx,))
    gm.meta["ffns"] = []
    before = gm(idx)
    return run(gm, TensorParallel(2, sequence_parallel=True)).graph_module, idx, before


def test_sequence_parallel_shards_the_tokens_between_the_regions():
    """The scatter after the embedding, the gather before the final norm, each region's input gathered and its
    output reduce-scattered over the sequence dim; the blocks' norms and the output projections' biases (which
    now see one rank's tokens) are in the plan as "sequence"; on one process the graph computes what it did."""
    gm, idx, before = _sequence_parallel(Tiny())
    gm.graph.lint()
    torch.testing.assert_close(_tensor(gm(idx)), _tensor(before), rtol=0, atol=0)
    calls = [(n.target.__name__, n.args[1:], n.args[0].name) for n in gm.graph.nodes
             if n.op == "call_function" and getattr(n.target, "__module__", "") == tensor_parallel.__name__]
    assert [c[:2] for c in calls] == [("scatter", (1,))] + [("enter_sp", (1,)), ("reduce_sp", (1,))] * 2 + \
        [("gather", (1,))]
    assert calls[0][2] == "embedding"
    ln_f = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.layer_norm.default
                and n.args[1:] and "ln_f" in str(n.meta.get("nn_module_stack")))
    assert ln_f.args[0].target is tensor_parallel.gather
    plan = gm.meta["tp_plan"]
    assert sorted(w for w, how in plan.items() if how["style"] == "sequence") == sorted(
        [f"ln.{i}.{p}" for i in range(2) for p in ("weight", "bias")] + [f"attn.{i}.c_proj.bias" for i in range(2)])


@pytest.mark.parametrize("model,message", [
    (Tiny(positions=True), "add_1 in the model computes on this rank's share of the tokens but reads the tensor "
                           "slice_1 of the whole sequence"),
    (Tiny(shared_norm=True), "ln_f.weight (tied to ln.0.weight) is used both on this rank's share of the tokens "
                             "and on all of them")])
def test_what_sequence_parallelism_would_compute_otherwise_is_refused_in_one_line(model, message):
    """A tensor of the whole sequence added to the residual stream between the regions; a norm used both in a
    block (on a token share) and as the final norm (on all tokens), whose gradient would be summed wrong."""
    with pytest.raises(MoecError) as e:
        _sequence_parallel(model)
    assert str(e.value) == f"tensor_parallel: --sequence-parallel: {message}; drop --sequence-parallel"


def test_a_sequence_length_tp_does_not_divide_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(tensor_parallel.groups, "get", lambda name: object() if name == "tp" else None)
    monkeypatch.setattr(tensor_parallel.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(tensor_parallel.dist, "get_rank", lambda group=None: 1)
    x = torch.arange(2 * 4 * 3.0).view(2, 4, 3)
    torch.testing.assert_close(tensor_parallel.scatter(x, 1), x[:, 2:])  # this rank's half of each sequence
    with pytest.raises(MoecError, match=r"^sequence parallelism splits the 5 tokens of each sequence over TP=2 "
                                        r"ranks, which must divide them: use a --seq-len that TP divides") as e:
        tensor_parallel.scatter(torch.zeros(2, 5, 3), 1)
    assert "\n" not in str(e.value)


def test_the_emitted_model_calls_the_sequence_parallel_collectives(tmp_path):
    """gpt.py upcycled with a shared expert, TP2 x EP2: each block gathers the tokens into attention and the
    shared expert (flattened tokens, dim 0) and reduce-scatters them out, averages its balance and z losses
    over the TP group with the group's expert counts; the model scatters after the embedding and gathers
    before the final norm; no plain enter or reduce is left."""
    from moec.base.options import Options
    from moec.driver.compiler import compile_model
    from tests.train.conftest import ROOT, TINY

    options = Options(experts=4, topk=2, overrides=TINY, verify=False, ep=2, tp=2, shared_experts=1,
                      sequence_parallel=True)
    compile_model(str(ROOT / "examples" / "gpt.py"), str(tmp_path), options, log=lambda *a: None)
    code = (tmp_path / "model.py").read_text()
    block, model = code.split("class HStack")[0], code.split("class Model")[1]
    calls = lambda text: [line.split("= ")[1].split("  #")[0].replace("moec_runtime_distributed_tensor_parallel_", "")
                          for line in text.splitlines() if "tensor_parallel_" in line and " = " in line]
    assert calls(block) == ["enter_sp(layer_norm, dim=1)", "reduce_sp(linear_1, dim=1)", "enter_sp(reshape_1, dim=0)",
                            "reduce_sp(linear_4, dim=0)", "tp_sum(balance_counts)", "tp_mean(load_balance_loss)",
                            "tp_mean(z_loss)"]
    assert calls(model) == ["scatter(add, dim=1)", "gather(x, dim=1)"]
    assert "layer_norm.default(gather," in model and "self.h(scatter," in model
