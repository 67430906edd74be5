import pytest
import torch
import torch.nn as nn

from moec.base.errors import MoecError
from moec.driver.capture import capture
from moec.passes.find_ffn import FindFFN
from tests.models import EXPECTED, captured, run


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_finds_every_ffn_whatever_its_names(kind):
    _, _, gm = captured(kind)
    result = run(gm, FindFFN())
    ffns = gm.meta["ffns"]
    act, gated = EXPECTED[kind]
    assert [f.module for f in ffns] == ["blocks.0", "blocks.1"]
    assert all(f.activation == act and f.gated == gated for f in ffns)
    assert not result.modified
    gm.graph.lint()


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
    with pytest.raises(MoecError, match="no feed-forward block"):
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
