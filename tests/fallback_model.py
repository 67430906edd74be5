"""A dense model torch.export rejects three times over: an operator with no fake
kernel, a function with data-dependent control flow (marked torch.fx.wrap), and
a dataclass output. moec captures it with the torch.fx.symbolic_trace front-end."""
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.library.custom_op("moectest::rmsnorm", mutates_args=())
def rmsnorm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _rmsnorm(x, w)


def _rmsnorm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _rmsnorm_backward(ctx, grad):
    x, w = ctx.saved_tensors
    with torch.enable_grad():
        x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
        return torch.autograd.grad(_rmsnorm(x, w), (x, w), grad)


rmsnorm.register_autograd(_rmsnorm_backward,
                          setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


def gate_positive(x, scale):
    if bool((scale > 0).all()):  # reads tensor values: export cannot trace past it
        return x * scale
    return x


torch.fx.wrap("gate_positive")


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    note: str = "dense"


class Block(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.norm = nn.Parameter(torch.ones(dim))
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x + gate_positive(self.down(F.gelu(self.up(rmsnorm(x, self.norm)))), self.scale)


class Model(nn.Module):
    def __init__(self, vocab=256, dim=24, hidden=64, layers=2, max_seq=64):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_seq, dim)
        self.emb.weight.data.mul_(0.1)
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return Output(self.head(x))


def build_model(config=None, **overrides):
    return Model(**overrides)
