"""tensor_parallel on attention blocks (GPT's fused q/k/v, Llama's grouped heads with rotary embedding) and an
FFN: on one process the graph computes what it did; each TP rank's code, run on its slices of the weights,
gives partial outputs whose sum is the whole (the sizes it reads are the local ones), also for fewer tokens
than TP ranks; what it cannot split
is refused in one line."""
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
