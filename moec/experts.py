"""moec::experts: every local expert's FFN over the expert-grouped buffer.

Legend: N rows of the grouped buffer, D hidden, F expert ffn width, E experts.
Rows offsets[e]:offsets[e+1] belong to expert e; rows at or past offsets[E]
are unused and come out zero. Plain FFN: act(x W1^T + b1) W2^T + b2; gated
(w3 given): (act(x W1^T + b1) * (x W3^T + b3)) W2^T + b2.
Weights: w1, w3 [E, F, D]; w2 [E, D, F]; biases b1, b3 [E, F], b2 [E, D].
"""
from typing import Optional

import torch
import torch.nn.functional as Fn
from torch import Tensor

ACTIVATIONS = {
    "relu": Fn.relu,
    "gelu": Fn.gelu,
    "gelu_tanh": lambda x: Fn.gelu(x, approximate="tanh"),
    "silu": Fn.silu,
}


def _ffn(x, w1, b1, w3, b3, w2, b2, activation):
    h = ACTIVATIONS[activation](Fn.linear(x, w1, b1))
    if w3 is not None:
        h = h * Fn.linear(x, w3, b3)
    return Fn.linear(h, w2, b2)


def experts_reference(x, offsets, w1, b1, w3, b3, w2, b2, activation):
    """Loop over experts; differentiable in every tensor argument."""
    pick = lambda t, e: None if t is None else t[e]
    bounds = offsets.tolist()
    parts = [_ffn(x[bounds[e]:bounds[e + 1]], w1[e], pick(b1, e), pick(w3, e), pick(b3, e), w2[e], pick(b2, e),
                  activation) for e in range(w1.shape[0])]
    parts.append(x.new_zeros(x.shape[0] - bounds[-1], w2.shape[1]))
    return torch.cat(parts)


@torch.library.custom_op("moec::experts", mutates_args=())
def experts(x: Tensor, offsets: Tensor, w1: Tensor, b1: Optional[Tensor], w3: Optional[Tensor],
            b3: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], activation: str) -> Tensor:
    return experts_reference(x, offsets, w1, b1, w3, b3, w2, b2, activation)


@experts.register_fake
def _(x, offsets, w1, b1, w3, b3, w2, b2, activation):
    return x.new_empty(x.shape[0], w2.shape[1])


_SQRT_2PI = 2.5066282746310002


def activation_grad(h: Tensor, activation: str) -> Tensor:
    """d act(h) / d h, elementwise."""
    if activation == "relu":
        return (h > 0).to(h.dtype)
    if activation == "silu":
        s = torch.sigmoid(h)
        return s * (1 + h * (1 - s))
    if activation == "gelu":
        return 0.5 * (1 + torch.erf(h * 0.7071067811865476)) + h * torch.exp(-0.5 * h * h) / _SQRT_2PI
    c = 0.7978845608028654  # sqrt(2/pi), gelu_tanh
    u = torch.tanh(c * (h + 0.044715 * h ** 3))
    return 0.5 * (1 + u) + 0.5 * h * (1 - u * u) * c * (1 + 3 * 0.044715 * h * h)


def _ffn_backward(g, x, w1, b1, w3, b3, w2, activation):
    h1 = Fn.linear(x, w1, b1)
    a = ACTIVATIONS[activation](h1)
    h3 = None if w3 is None else Fn.linear(x, w3, b3)
    h = a if h3 is None else a * h3
    g_h = g @ w2  # [n, F]
    g_w2, g_b2 = g.t() @ h, g.sum(0)
    g_a = g_h if h3 is None else g_h * h3
    g_h1 = g_a * activation_grad(h1, activation)
    g_x = g_h1 @ w1
    out = {"w1": g_h1.t() @ x, "b1": g_h1.sum(0), "w2": g_w2, "b2": g_b2}
    if h3 is not None:
        g_h3 = g_h * a
        g_x = g_x + g_h3 @ w3
        out.update(w3=g_h3.t() @ x, b3=g_h3.sum(0))
    return g_x, out


@torch.library.custom_op("moec::experts_backward", mutates_args=())
def experts_backward(g_out: Tensor, x: Tensor, offsets: Tensor, w1: Tensor, b1: Optional[Tensor],
                     w3: Optional[Tensor], b3: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                     activation: str) -> list[Tensor]:
    """Gradients [x, w1, b1, w3, b3, w2, b2]; an absent optional gets an empty tensor."""
    params = {"w1": w1, "b1": b1, "w3": w3, "b3": b3, "w2": w2, "b2": b2}
    grads = {n: torch.zeros_like(t) for n, t in params.items() if t is not None}
    g_x = torch.zeros_like(x)
    pick = lambda t, e: None if t is None else t[e]
    bounds = offsets.tolist()
    for e in range(w1.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue
        g_x[lo:hi], ge = _ffn_backward(g_out[lo:hi], x[lo:hi], w1[e], pick(b1, e), pick(w3, e), pick(b3, e),
                                       w2[e], activation)
        for n in grads:
            grads[n][e] = ge[n]
    return [g_x] + [grads[n] if n in grads else x.new_empty(0) for n in params]


@experts_backward.register_fake
def _(g_out, x, offsets, w1, b1, w3, b3, w2, b2, activation):
    return [x.new_empty(0) if t is None else torch.empty_like(t) for t in (x, w1, b1, w3, b3, w2, b2)]


def _setup(ctx, inputs, output):
    x, offsets, w1, b1, w3, b3, w2, b2, activation = inputs
    ctx.save_for_backward(x, offsets, w1, b1, w3, b3, w2, b2)
    ctx.activation = activation


def _backward(ctx, g_out):
    x, offsets, w1, b1, w3, b3, w2, b2 = ctx.saved_tensors
    g = experts_backward(g_out.contiguous(), x, offsets, w1, b1, w3, b3, w2, b2, ctx.activation)
    g = [None if t is None else gi for t, gi in zip((x, w1, b1, w3, b3, w2, b2), g)]
    return g[0], None, g[1], g[2], g[3], g[4], g[5], g[6], None


experts.register_autograd(_backward, setup_context=_setup)
