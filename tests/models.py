"""Tiny dense blocks in the shapes find_ffn must recognise, and a capture helper."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from moec.driver.capture import capture

D, FW = 16, 32


class Residual(nn.Module):
    """x + ffn(norm(x)) twice, so there are two FFNs and a residual stream."""

    def __init__(self, make_ffn):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.blocks = nn.ModuleList([make_ffn(), make_ffn()])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(self.norm(x))
        return x


class Functional(nn.Module):
    """Parameters used through F.linear, no Linear modules."""

    def __init__(self, act=F.relu):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(FW, D) * 0.2)
        self.b_in = nn.Parameter(torch.randn(FW) * 0.1)
        self.w_out = nn.Parameter(torch.randn(D, FW) * 0.2)
        self.act = act

    def forward(self, x):
        return F.linear(self.act(F.linear(x, self.w_in, self.b_in)), self.w_out)


class Gated(nn.Module):
    def __init__(self, act=F.silu, fused=False):
        super().__init__()
        self.fused = fused
        if fused:
            self.gate_up = nn.Linear(D, 2 * FW, bias=False)
        else:
            self.gate, self.up = nn.Linear(D, FW, bias=False), nn.Linear(D, FW, bias=False)
        self.down = nn.Linear(FW, D, bias=False)
        self.act = act

    def forward(self, x):
        if self.fused:
            g, u = self.gate_up(x).chunk(2, dim=-1)
        else:
            g, u = self.gate(x), self.up(x)
        return self.down(self.act(g) * u)


class Written(nn.Module):
    """An FFN whose activation and projections are written out by hand: act(up) or, gated, act(gate, up);
    projections by F.linear, or by matmul with W.T (Falcon's FalconLinear) or with a weight stored
    [in, out]."""

    def __init__(self, act, gated=False, matmul=None):
        super().__init__()
        in_out = matmul == "in_out"
        self.w_in = nn.Parameter(torch.randn(*((D, FW) if in_out else (FW, D))) * 0.2)
        self.w_gate = nn.Parameter(torch.randn(FW, D) * 0.2) if gated else None
        self.w_out = nn.Parameter(torch.randn(*((FW, D) if in_out else (D, FW))) * 0.2)
        self.b_out = nn.Parameter(torch.randn(D) * 0.1)
        self.act, self.matmul = act, matmul

    def forward(self, x):
        if self.matmul == "transposed":
            return self.act(x @ self.w_in.T) @ self.w_out.T + self.b_out
        if self.matmul == "in_out":
            return torch.matmul(self.act(torch.matmul(x, self.w_in)), self.w_out) + self.b_out
        up = F.linear(x, self.w_in)
        h = self.act(up) if self.w_gate is None else self.act(F.linear(x, self.w_gate), up)
        return F.linear(h, self.w_out, self.b_out)


def bloom_gelu(x):  # BLOOM's tanh GELU, spelled its own way
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


BLOCKS = {
    "sequential_gelu": lambda: nn.Sequential(nn.Linear(D, FW), nn.GELU(), nn.Linear(FW, D)),
    "sequential_relu": lambda: nn.Sequential(nn.Linear(D, FW), nn.ReLU(), nn.Linear(FW, D)),
    "functional_relu": lambda: Functional(),
    "functional_silu": lambda: Functional(F.silu),
    "swiglu": lambda: Gated(),
    "geglu": lambda: Gated(F.gelu),
    "fused_swiglu": lambda: Gated(fused=True),
    "spelled_gelu_tanh": lambda: Written(bloom_gelu),
    "spelled_swiglu": lambda: Written(lambda g, u: u * (g * torch.sigmoid(g)), gated=True),
    "matmul_transposed_gelu": lambda: Written(F.gelu, matmul="transposed"),
    "matmul_in_out_relu": lambda: Written(F.relu, matmul="in_out"),
    "squared_relu": lambda: Written(lambda u: torch.relu(u).square()),
    "quick_gelu_glu": lambda: Written(lambda g, u: g * torch.sigmoid(1.702 * g) * u, gated=True),
}
EXPRESSION = None  # EXPECTED's activation for an FFN kept as an elementwise expression
EXPECTED = {"sequential_gelu": ("gelu", False), "sequential_relu": ("relu", False),
            "functional_relu": ("relu", False), "functional_silu": ("silu", False), "swiglu": ("silu", True),
            "geglu": ("gelu", True), "fused_swiglu": ("silu", True), "spelled_gelu_tanh": ("gelu_tanh", False),
            "spelled_swiglu": ("silu", True), "matmul_transposed_gelu": ("gelu", False),
            "matmul_in_out_relu": ("relu", False), "squared_relu": (EXPRESSION, False),
            "quick_gelu_glu": (EXPRESSION, True)}


def captured(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = Residual(BLOCKS[kind])
    x = torch.randn(2, 5, D)
    return model, x, capture(model, (x,))


def run(gm, p):
    """Run one pass under the pass manager (its checks, lint, recompile and shape propagation), and make the
    experts ffn_to_moe leaves to load time, as a one-process build loads them, so the graph runs."""
    from moec.driver.pipeline import run_pass
    from moec.runtime.upcycle import upcycle_graph

    result = run_pass(gm, p, [])
    upcycle_graph(gm)
    return result
