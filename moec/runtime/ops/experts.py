"""moec::experts: every local expert's FFN over the expert-grouped buffer.

Legend: N rows of the grouped buffer, D hidden, F expert ffn width, E experts.
Rows offsets[e]:offsets[e+1] belong to expert e; rows at or past offsets[E]
are unused and come out zero. Plain FFN: act(x W1^T + b1) W2^T + b2; gated
(w3 given): (act(x W1^T + b1) * (x W3^T + b3)) W2^T + b2.
Weights: w1, w3 [E, F, D]; w2 [E, D, F]; biases b1, b3 [E, F], b2 [E, D].

Backends, one op (`backend="auto"` picks by select_backend's rule):
- "reference": a Python loop over experts in plain torch (any device; the
  ground truth; it reads offsets on the host).
- "grouped_mm": torch._grouped_mm for the GEMMs, torch for the elementwise
  parts (NVIDIA sm_90+, bf16).
- "triton": moec's portable grouped GEMM (moec.runtime.kernels.grouped_gemm), with
  the activation and the gating multiply fused into the first GEMM's epilogue;
  the activation backward is fused into the dH GEMM's epilogue or, where the
  arch's LAUNCH row sets split_bwd (sm90, by measurement), runs as one
  elementwise kernel after it (any GPU; the fast path on AMD, where
  torch._grouped_mm is a per-expert loop or missing).
Neither GPU backend synchronizes with the host.

Activation: one of ACTIVATIONS, fused into the kernels, or an elementwise
expression over h1 (and h3) as moec.runtime.ops.elementwise writes it, for an
FFN whose elementwise part is none of them (squared ReLU, a hand-written
GELU variant): every backend then runs its plain grouped GEMMs and evaluates
the expression in float32 between them with torch, its gradient by autograd.

Activation memory: by default forward keeps the pre-activations h1 (and h3)
[N, F] for backward. recompute=True (`moec compile --recompute-experts`) keeps
only the op's inputs and recomputes them in backward with one more first-GEMM
pass: 2*N*D*F (4*N*D*F gated) more FLOPs, and N*F (2*N*F gated) elements of
activation memory fewer per layer.
"""
import os
from typing import Optional

import torch
import torch.nn.functional as Fn
from torch import Tensor

from moec.base.errors import MoecError
from moec.runtime.ops import elementwise, weight_copies

BACKENDS = ("reference", "grouped_mm", "triton")

ACTIVATIONS = {
    "relu": Fn.relu,
    "gelu": Fn.gelu,
    "gelu_tanh": lambda x: Fn.gelu(x, approximate="tanh"),
    "silu": Fn.silu,
}


def glu(activation: str, h1: Tensor, h3: Optional[Tensor] = None) -> Tensor:
    """The FFN's elementwise part: act(h1), times h3 when gated, or the expression at (h1, h3)."""
    if elementwise.is_expression(activation):
        up = lambda t: None if t is None else t.float()
        return elementwise.evaluate(activation, up(h1), up(h3)).to(h1.dtype)
    a = ACTIVATIONS[activation](h1)
    return a if h3 is None else a * h3


def glu_vjp(activation: str, g_h: Tensor, h1: Tensor, h3: Optional[Tensor] = None):
    """(g_h1, g_h3, h) for h = glu(activation, h1, h3) and g_h = dL/dh; g_h3 None when plain."""
    if elementwise.is_expression(activation):
        # torch.func, not autograd: inside a custom op's kernel the autograd keys are turned off
        f = lambda *hs: elementwise.evaluate(activation, *hs)
        h, vjp = torch.func.vjp(f, *[t.float() for t in (h1, h3) if t is not None])
        grads = vjp(g_h.float())
        g1, g3 = grads[0].to(h1.dtype), None if h3 is None else grads[1].to(h3.dtype)
        return g1, g3, h.to(h1.dtype)
    a = ACTIVATIONS[activation](h1)
    g_a = g_h if h3 is None else g_h * h3
    return g_a * activation_grad(h1, activation), None if h3 is None else g_h * a, a if h3 is None else a * h3


def _ffn(x, w1, b1, w3, b3, w2, b2, activation):
    h = glu(activation, Fn.linear(x, w1, b1), None if w3 is None else Fn.linear(x, w3, b3))
    return Fn.linear(h, w2, b2)


def experts_reference(x, offsets, w1, b1, w3, b3, w2, b2, activation):
    """Loop over experts; differentiable in every tensor argument."""
    pick = lambda t, e: None if t is None else t[e]
    bounds = offsets.tolist()
    parts = [_ffn(x[bounds[e]:bounds[e + 1]], w1[e], pick(b1, e), pick(w3, e), pick(b3, e), w2[e], pick(b2, e),
                  activation) for e in range(w1.shape[0])]
    parts.append(x.new_zeros(x.shape[0] - bounds[-1], w2.shape[1]))
    return torch.cat(parts)


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
    h3 = None if w3 is None else Fn.linear(x, w3, b3)
    g_h1, g_h3, h = glu_vjp(activation, g @ w2, h1, h3)  # g @ w2: [n, F]
    g_x = g_h1 @ w1
    out = {"w1": g_h1.t() @ x, "b1": g_h1.sum(0), "w2": g.t() @ h, "b2": g.sum(0)}
    if h3 is not None:
        g_x = g_x + g_h3 @ w3
        out.update(w3=g_h3.t() @ x, b3=g_h3.sum(0))
    return g_x, out


def reference_backward(g_out, x, offsets, w1, b1, w3, b3, w2, b2, activation):
    """Gradients [x, w1, b1, w3, b3, w2, b2] (None for absent tensors), looping over experts."""
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
    return [g_x] + [grads.get(n) for n in params]


# ---- GEMMs and elementwise part as separate kernels: the "grouped_mm" backend,
# and the "triton" backend for an expression activation (no fused epilogue).
# torch._grouped_mm takes END offsets and leaves rows past the last one
# unwritten, so the last expert's GEMM is stretched over the unused tail and
# the tail of every elementwise result is zeroed (zero rows in, zero rows out,
# with no host sync to learn where the tail starts).

def _row_bias(b, offsets, N):
    """[N, C]: bias row of each row's expert (the tail gets the last expert's; it is masked after)."""
    rows = torch.arange(N, device=offsets.device, dtype=offsets.dtype)
    seg = torch.searchsorted(offsets[1:].contiguous(), rows, right=True).clamp_(max=b.shape[0] - 1)
    return b[seg]


class _TorchGroupedMM:
    """Per expert e, rows r of a: a[r] @ b[e] (+ bias[e]) with torch._grouped_mm."""

    def __init__(self, offsets, N):
        self.offsets, self.N = offsets, N
        self.ends = offsets[1:]  # [E] end rows, what torch._grouped_mm calls offs
        self.stretched = self.ends.clone()
        self.stretched[-1:] = N
        self.used = (torch.arange(N, device=offsets.device, dtype=offsets.dtype) < offsets[-1:]).unsqueeze(1)

    def mm(self, a, b, bias=None):
        out = torch._grouped_mm(a, b, offs=self.stretched)
        return out if bias is None else torch.where(self.used, out + _row_bias(bias, self.offsets, self.N), 0)

    def wgrad(self, a, b):
        """[E, ., .] = a[rows]^T @ b[rows] per expert; zero for an empty expert."""
        return torch._grouped_mm(a.t(), b, offs=self.ends)


class _TritonGroupedMM:
    """The same products with moec's Triton grouped GEMM (plain epilogue)."""

    def __init__(self, offsets, N):
        self.offsets = offsets.to(torch.int32)

    def mm(self, a, b, bias=None):
        from moec.runtime.kernels.grouped_gemm import MM, grouped_mm

        out = a.new_empty(a.shape[0], b.shape[2])
        grouped_mm(MM, a.contiguous(), b, self.offsets, out, bias=bias)
        return out

    def wgrad(self, a, b):
        from moec.runtime.kernels.grouped_gemm import grouped_wgrad

        return grouped_wgrad(a.contiguous(), b.contiguous(), self.offsets)


def _glu_rows(h1, h3, offsets, activation):
    """h [N, F] with a zero tail: the fused activations' elementwise kernel, or the expression in torch."""
    if elementwise.is_expression(activation):
        used = torch.arange(h1.shape[0], device=h1.device) < offsets[-1:].to(torch.int64)
        return torch.where(used.unsqueeze(1), glu(activation, h1, h3), 0)
    from moec.runtime.kernels.grouped_gemm_glu import glu_forward

    return glu_forward(h1, h3, offsets, activation)


def _glu_rows_backward(g_h, h1, h3, offsets, activation):
    """(g_h1, g_h3, h) with zero tails; g_h3 None when plain."""
    if elementwise.is_expression(activation):
        used = (torch.arange(h1.shape[0], device=h1.device) < offsets[-1:].to(torch.int64)).unsqueeze(1)
        zero_tail = lambda t: None if t is None else torch.where(used, t, 0)
        return tuple(zero_tail(t) for t in glu_vjp(activation, g_h, h1, h3))
    from moec.runtime.kernels.grouped_gemm_glu import glu_backward

    g_pre, h = glu_backward(g_h, h1, h3, offsets, activation)
    F = h1.shape[1]
    return (g_pre, None, h) if h3 is None else (g_pre[:, :F], g_pre[:, F:], h)


def _pre(g, x, w1, b1, w3, b3):
    h1 = g.mm(x, w1.transpose(1, 2), b1)  # [N, F]
    return h1, None if w3 is None else g.mm(x, w3.transpose(1, 2), b3)


def _split_forward(kind, x, offsets, w1, b1, w3, b3, w2, b2, activation, save):
    g = kind(offsets, x.shape[0])
    h1, h3 = _pre(g, x, w1, b1, w3, b3)
    out = g.mm(_glu_rows(h1, h3, offsets, activation), w2.transpose(1, 2), b2)  # [N, D]
    return out, (h1 if save else None), (h3 if save else None)


def _split_backward(kind, g_out, x, offsets, w1, b1, w3, b3, w2, b2, activation, h1, h3):
    g = kind(offsets, x.shape[0])
    if h1 is None:
        h1, h3 = _pre(g, x, w1, b1, w3, b3)
    g_h1, g_h3, h = _glu_rows_backward(g.mm(g_out, w2), h1, h3, offsets, activation)
    g_x = g.mm(g_h1, w1)
    if h3 is not None:
        g_x = g_x + g.mm(g_h3, w3)
    bias_grad = lambda b, t: None if b is None else _segment_sum(t, offsets).to(b.dtype)
    return [g_x, g.wgrad(g_h1, x), bias_grad(b1, g_h1), None if h3 is None else g.wgrad(g_h3, x),
            bias_grad(b3, g_h3), g.wgrad(g_out, h), bias_grad(b2, g_out)]


def _segment_sum(t, offsets):
    from moec.runtime.kernels.grouped_gemm import segment_sum

    return segment_sum(t, offsets)


# ---- backend choice

def choose_backend(device_type: str, dtype: torch.dtype, hip: bool, capability: tuple, has_grouped_mm: bool) -> str:
    """The rule: a tensor off the GPU runs "reference". On an NVIDIA GPU of
    compute capability 9.0 or newer, bf16 runs "grouped_mm" when this torch has
    torch._grouped_mm (its CUTLASS kernels are tuned there). Every other GPU case
    (AMD, where torch._grouped_mm is a per-expert loop or missing; older NVIDIA;
    fp16/fp32; a torch without it) runs "triton"; float64, which Triton's dot
    lacks, runs "reference"."""
    if device_type != "cuda" or dtype == torch.float64:
        return "reference"
    if not hip and capability >= (9, 0) and dtype == torch.bfloat16 and has_grouped_mm:
        return "grouped_mm"
    return "triton"


def select_backend(x: Tensor) -> str:
    """choose_backend for x's device and dtype."""
    on_gpu = x.device.type == "cuda"
    return choose_backend(x.device.type, x.dtype, torch.version.hip is not None,
                          torch.cuda.get_device_capability(x.device) if on_gpu else (0, 0),
                          hasattr(torch, "_grouped_mm"))


def _resolve(backend, x, offsets, w1, w3, w2, activation) -> str:
    """Validate the call; the backend that will run it."""
    if elementwise.is_expression(activation):
        if elementwise.uses_h3(activation) != (w3 is not None):
            raise MoecError(f"experts: activation expression {activation!r} "
                            f"{'does not use' if w3 is not None else 'uses'} h3, but the experts are "
                            f"{'gated' if w3 is not None else 'plain'}")
    elif activation not in ACTIVATIONS:
        raise MoecError(f"experts: unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)} "
                        f"or an elementwise expression over h1 (and h3)")
    E, F, D = w1.shape
    if x.dim() != 2 or x.shape[1] != D or w2.shape != (E, D, F) or (w3 is not None and w3.shape != w1.shape):
        raise MoecError(f"experts: shapes x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)} do not "
                        f"fit [N, D], [E, F, D], [E, D, F]; fix the expert weights' layout")
    if offsets.shape != (E + 1,):
        raise MoecError(f"experts: offsets has shape {tuple(offsets.shape)}, expected [E+1] = [{E + 1}] "
                        f"(start row of each expert, then the end)")
    if backend == "auto":
        return select_backend(x)
    if backend not in BACKENDS:
        raise MoecError(f"experts: unknown backend {backend!r}; use 'auto' or one of {BACKENDS}")
    if backend == "grouped_mm" and (x.device.type != "cuda" or x.dtype != torch.bfloat16
                                    or not hasattr(torch, "_grouped_mm")):
        raise MoecError("experts: backend 'grouped_mm' needs bf16 tensors on a CUDA GPU and a torch with "
                        "torch._grouped_mm; use backend='auto'")
    if backend == "triton" and (x.dtype == torch.float64
                                or (x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1")):
        raise MoecError("experts: backend 'triton' needs a GPU (or TRITON_INTERPRET=1) and bf16/fp16/fp32; "
                        "use backend='auto'")
    return backend


def _keeps_pre(backend: str, save: bool) -> bool:
    return save and backend != "reference"


# ---- the ops

@torch.library.custom_op("moec::experts_forward", mutates_args=())
def experts_forward(x: Tensor, offsets: Tensor, w1: Tensor, b1: Optional[Tensor], w3: Optional[Tensor],
                    b3: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], activation: str, save: bool,
                    backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """out [N, D], and for backward the pre-activations h1 and (gated) h3 [N, F];
    an empty tensor for each one not kept (save False, plain FFN's h3, or the
    reference backend, which recomputes)."""
    backend = _resolve(backend, x, offsets, w1, w3, w2, activation)
    empty = x.new_empty(0)
    if x.shape[0] == 0:
        return x.new_zeros(0, w2.shape[1]), empty, empty.clone()
    if backend == "reference":
        return experts_reference(x, offsets, w1, b1, w3, b3, w2, b2, activation), empty, empty.clone()
    if backend == "grouped_mm":
        out, h1, h3 = _split_forward(_TorchGroupedMM, x, offsets, w1, b1, w3, b3, w2, b2, activation, save)
    elif elementwise.is_expression(activation):
        out, h1, h3 = _split_forward(_TritonGroupedMM, x, offsets, w1, b1, w3, b3, w2, b2, activation, save)
    else:
        from moec.runtime.kernels.grouped_gemm import experts_forward as triton_forward

        out, h1, h3 = triton_forward(x, offsets.to(torch.int32), w1, b1, w3, b3, w2, b2, activation, save)
    return out, empty if h1 is None else h1, empty.clone() if h3 is None else h3


@experts_forward.register_fake
def _(x, offsets, w1, b1, w3, b3, w2, b2, activation, save, backend):
    backend = _resolve(backend, x, offsets, w1, w3, w2, activation)
    N, F = x.shape[0], w1.shape[1]
    keep = _keeps_pre(backend, save) and N > 0
    return (x.new_empty(N, w2.shape[1]), x.new_empty(N, F) if keep else x.new_empty(0),
            x.new_empty(N, F) if keep and w3 is not None else x.new_empty(0))


@torch.library.custom_op("moec::experts_backward", mutates_args=())
def experts_backward(g_out: Tensor, x: Tensor, offsets: Tensor, w1: Tensor, b1: Optional[Tensor],
                     w3: Optional[Tensor], b3: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                     activation: str, h1: Optional[Tensor] = None, h3: Optional[Tensor] = None,
                     backend: str = "auto") -> list[Tensor]:
    """Gradients [x, w1, b1, w3, b3, w2, b2]; an absent optional gets an empty tensor.
    h1, h3: the pre-activations experts_forward kept, or None to recompute them."""
    backend = _resolve(backend, x, offsets, w1, w3, w2, activation)
    g_out = g_out.contiguous()
    if x.shape[0] == 0:
        grads = [torch.zeros_like(x)] + [None if t is None else torch.zeros_like(t) for t in (w1, b1, w3, b3, w2, b2)]
    elif backend == "reference":
        grads = reference_backward(g_out, x, offsets, w1, b1, w3, b3, w2, b2, activation)
    elif backend == "grouped_mm":
        grads = _split_backward(_TorchGroupedMM, g_out, x, offsets, w1, b1, w3, b3, w2, b2, activation, h1, h3)
    elif elementwise.is_expression(activation):
        grads = _split_backward(_TritonGroupedMM, g_out, x, offsets, w1, b1, w3, b3, w2, b2, activation, h1, h3)
    else:
        from moec.runtime.kernels.grouped_gemm import experts_backward as triton_backward

        grads = triton_backward(g_out, x, offsets.to(torch.int32), w1, b1, w3, b3, w2, b2, activation, h1, h3)
    return [x.new_empty(0) if g is None else g for g in grads]


@experts_backward.register_fake
def _(g_out, x, offsets, w1, b1, w3, b3, w2, b2, activation, h1=None, h3=None, backend="auto"):
    return [x.new_empty(0) if t is None else torch.empty_like(t) for t in (x, w1, b1, w3, b3, w2, b2)]


def _setup(ctx, inputs, output):
    x, offsets, w1, b1, w3, b3, w2, b2, activation, _save, backend = inputs
    _, h1, h3 = output
    ctx.save_for_backward(x, offsets, w1, b1, w3, b3, w2, b2, h1, h3)
    ctx.activation, ctx.backend = activation, backend


def _backward(ctx, g_out, _g_h1, _g_h3):
    x, offsets, w1, b1, w3, b3, w2, b2, h1, h3 = ctx.saved_tensors
    kept = lambda t: t if t.numel() else None
    g = experts_backward(g_out, x, offsets, w1, b1, w3, b3, w2, b2, ctx.activation, kept(h1), kept(h3),
                         ctx.backend)
    g = [None if t is None else gi for t, gi in zip((x, w1, b1, w3, b3, w2, b2), g)]
    return g[0], None, g[1], g[2], g[3], g[4], g[5], g[6], None, None, None


experts_forward.register_autograd(_backward, setup_context=_setup)

# The public op. Its autograd kernel routes through experts_forward, whose extra
# outputs carry what backward needs; capture (export) records moec::experts itself.
_lib = torch.library.Library("moec", "FRAGMENT")
_lib.define("experts(Tensor x, Tensor offsets, Tensor w1, Tensor? b1, Tensor? w3, Tensor? b3, Tensor w2, "
            "Tensor? b2, str activation, bool recompute=False, str backend='auto') -> Tensor")


def _experts_plain(x, offsets, w1, b1, w3, b3, w2, b2, activation, recompute=False, backend="auto"):
    return experts_forward(x, offsets, w1, b1, w3, b3, w2, b2, activation, False, backend)[0]


def _experts_autograd(x, offsets, w1, b1, w3, b3, w2, b2, activation, recompute=False, backend="auto"):
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w1, b1, w3, b3, w2, b2))
    return experts_forward(x, offsets, w1, b1, w3, b3, w2, b2, activation, needs_grad and not recompute, backend)[0]


def _experts_fake(x, offsets, w1, b1, w3, b3, w2, b2, activation, recompute=False, backend="auto"):
    _resolve(backend, x, offsets, w1, w3, w2, activation)
    return x.new_empty(x.shape[0], w2.shape[1])


_lib.impl("experts", _experts_plain, "CompositeExplicitAutograd")
_lib.impl("experts", _experts_autograd, "Autograd")
torch.library.register_fake("moec::experts", _experts_fake, lib=_lib)
# Under CUDA autocast the expert GEMMs run in bf16 like every other linear (autocast does not reach inside
# custom ops on its own), with the weights' bf16 copies kept between micro-batches (weight_copies).
weight_copies.register_autocast("moec::experts", "cuda", torch.bfloat16)


def experts(x: Tensor, offsets: Tensor, w1: Tensor, b1: Optional[Tensor], w3: Optional[Tensor],
            b3: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], activation: str, recompute: bool = False,
            backend: str = "auto") -> Tensor:
    """Every expert's FFN over its rows of x [N, D] -> [N, D] (see the module docstring)."""
    return torch.ops.moec.experts(x, offsets, w1, b1, w3, b3, w2, b2, activation, recompute, backend)
