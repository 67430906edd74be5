import pytest
import torch
import torch.nn as nn

from moec.base.errors import MoecError
from moec.driver.capture import capture
from moec.passes.find_ffn import FindFFN
from moec.runtime.ops import elementwise
from tests.models import EXPECTED, EXPRESSION, FW, captured, run


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_finds_every_ffn_whatever_its_names(kind):
    _, _, gm = captured(kind)
    result = run(gm, FindFFN())
    ffns = gm.meta["ffns"]
    act, gated = EXPECTED[kind]
    assert [f.module for f in ffns] == ["blocks.0", "blocks.1"]
    for f in ffns:
        assert f.gated == gated
        assert elementwise.is_expression(f.activation) if act is EXPRESSION else f.activation == act
        assert f.w1.fetch(gm).shape == (FW, 16) and f.w2.fetch(gm).shape == (16, FW)
    assert not result.modified
    gm.graph.lint()


def test_spelled_out_gate_finds_which_projection_is_gated():
    model, _, gm = captured("spelled_swiglu")  # u * silu(g): the gate is the second projection written
    run(gm, FindFFN())
    f = gm.meta["ffns"][0]
    assert torch.equal(f.w1.fetch(gm), model.blocks[0].w_gate) and torch.equal(f.w3.fetch(gm), model.blocks[0].w_in)


def test_weights_of_matmul_projections_are_read_the_right_way_round():
    for kind, stored_in_out in (("matmul_transposed_gelu", False), ("matmul_in_out_relu", True)):
        model, _, gm = captured(kind)
        run(gm, FindFFN())
        f, block = gm.meta["ffns"][0], model.blocks[0]
        as_out_in = lambda w: w.t() if stored_in_out else w
        assert torch.equal(f.w1.fetch(gm), as_out_in(block.w_in))
        assert torch.equal(f.w2.fetch(gm), as_out_in(block.w_out))
        assert torch.equal(f.b2.fetch(gm), block.b_out)


def test_fused_gate_up_halves_map_to_w1_and_w3():
    model, _, gm = captured("fused_swiglu")
    run(gm, FindFFN())
    f = gm.meta["ffns"][0]
    full = model.blocks[0].gate_up.weight
    assert torch.equal(f.w1.fetch(gm), full[:32]) and torch.equal(f.w3.fetch(gm), full[32:])


def test_no_ffn_is_an_error():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(16, 16)

        def forward(self, x):
            return torch.softmax(self.q(x) @ x.transpose(-1, -2), -1) @ x

    gm = capture(Attention(), (torch.randn(2, 5, 16),))
    with pytest.raises(MoecError, match="no feed-forward block moec can upcycle \\(looked for"):
        run(gm, FindFFN())


def test_ffn_whose_hidden_state_escapes_is_not_matched():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            h = torch.relu(self.up(x))
            return self.down(h) + h.sum(-1, keepdim=True)

    gm = capture(Leaky(), (torch.randn(2, 5, 16),))
    with pytest.raises(MoecError):
        run(gm, FindFFN())


def _block(forward, init):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            init(self)

        def forward(self, x):
            return forward(self, x)

    return Block()


def test_a_non_elementwise_op_between_the_projections_is_named_with_the_module():
    def init(m):
        m.up, m.down, m.norm = nn.Linear(16, 32), nn.Linear(32, 16), nn.LayerNorm(32)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = _block(lambda m, x: m.down(m.norm(torch.relu(m.up(x)))), init)

        def forward(self, x):
            return x + self.mlp(x)

    gm = capture(Model(), (torch.randn(2, 5, 16),))
    with pytest.raises(MoecError, match=r"^find_ffn: no feed-forward block moec can upcycle: mlp: left dense: "
                                        r"aten.layer_norm.default between the projections is not elementwise$"):
        run(gm, FindFFN())


def test_a_projection_that_also_feeds_attention_is_named_with_the_module():
    def init(m):
        m.fused, m.down = nn.Linear(16, 48), nn.Linear(32, 16)

    def parallel(m, x):  # one projection for the FFN's up and the attention's value (PaLM-style fusion)
        up_v = m.fused(x)
        up, v = up_v[..., :32], up_v[..., 32:]
        attn = torch.softmax(x @ x.transpose(-1, -2), -1) @ v
        return m.down(torch.relu(up)) + attn

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = _block(parallel, init)

        def forward(self, x):
            return x + self.layer(x)

    gm = capture(Model(), (torch.randn(2, 5, 16),))
    with pytest.raises(MoecError, match=r"^find_ffn: no feed-forward block moec can upcycle: layer: left dense: "):
        run(gm, FindFFN())


@pytest.mark.parametrize("example, layers", [("gpt.py", 4), ("llama.py", 4)])
def test_the_examples_norms_on_the_residual_stream_raise_no_false_alarm(example, layers):
    from pathlib import Path

    from moec.driver.capture import build, example_inputs, load_module

    mod = load_module(str(Path(__file__).resolve().parents[2] / "examples" / example))
    model = build(mod, "build_model", None, {}, "meta")
    gm = capture(model, example_inputs(mod, model, 2, 16, "meta"))
    p = FindFFN()
    run(gm, p)
    assert len(gm.meta["ffns"]) == layers and p.warnings(gm) == []  # every FFN found, nothing "left dense"
