"""What capture hands the passes: a graph that runs in any dtype training picks, whose every tensor is a
parameter or a buffer."""
import torch
import torch.nn as nn

from moec.codegen.program import weights
from moec.driver.capture import EVAL_FRONTEND, capture


class Casting(nn.Module):
    """Rotary-style: a constant made in forward, and a cast up to float32 (as HF models do)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        h = self.proj(x)
        scale = torch.tensor([0.5, 2.0] * 4)
        return h.float() * scale


def test_the_graph_runs_under_bf16_autocast_as_the_model_does():
    model = Casting()
    x = torch.randn(3, 8)
    gm = capture(model, (x,))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # traced in float32, trained in bf16
        got, want = gm(x)["logits"], model(x)
    assert torch.equal(got, want)


def test_every_tensor_the_graph_reads_is_a_weight_of_the_build():
    gm = capture(Casting(), (torch.randn(3, 8),))
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"
            and isinstance(getattr(gm.get_submodule(n.target.rpartition(".")[0]), n.target.rpartition(".")[2]),
                           torch.Tensor)}
    assert read and read <= set(weights(gm))


class LayerDrop(nn.Module):
    """OPT's layer drop as transformers 5.17 writes it: in training mode a random draw, compared in Python,
    decides whether the layer runs, even when the drop probability is 0."""

    def __init__(self):
        super().__init__()
        self.proj, self.layerdrop = nn.Linear(8, 8), 0.0

    def forward(self, x):
        if self.training:
            if torch.rand([]) < self.layerdrop:
                return x
        return x + self.proj(x)


def test_a_model_whose_training_mode_branches_on_random_data_is_captured_in_eval_mode():
    model = LayerDrop()
    x = torch.randn(3, 8)
    gm = capture(model, (x,))
    assert gm.meta["frontend"] == EVAL_FRONTEND
    assert model.training  # given back in the mode it came in
    assert torch.equal(gm(x)["logits"], model.eval()(x))
