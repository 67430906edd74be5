"""Row-masked activation and gating of the expert FFN as a standalone
elementwise kernel, for GEMMs that have no fused epilogue (torch._grouped_mm)
or where fusing it costs more than it saves.

Legend: N rows of the grouped buffer, F expert ffn width, E experts.
forward:  h = act(h1) * h3 (plain FFN: act(h1)), zero on rows >= offsets[E].
backward: from g_h = dL/dh: g_h1 = g_h * h3 * act'(h1), g_h3 = g_h * act(h1),
          and h (for W2's gradient), all zero on rows >= offsets[E].
Roofline (bytes, b per element): forward reads 2*N*F*b and writes N*F*b;
backward reads 3*N*F*b and writes 3*N*F*b; nothing else, so it runs at copy
bandwidth.
"""
import torch
import triton
import triton.language as tl

from moec.runtime.kernels import launch
from moec.runtime.kernels.grouped_gemm import ACTS, _act, _act_grad


@triton.jit
def glu_rows_kernel(h1_ptr, h3_ptr, g_ptr, offs_ptr, g1_ptr, g3_ptr, h_ptr, N, F, E, stride_in, stride_g,
                    stride_h, BACKWARD: tl.constexpr, GATED: tl.constexpr, ACT_FN: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    used = rows < tl.load(offs_ptr + E)
    mask = (rows < N)[:, None] & (cols < F)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    inp = r64 * stride_in + cols[None, :]
    h1 = tl.load(h1_ptr + inp, mask=mask, other=0.0).to(tl.float32)
    a = _act(h1, ACT_FN)
    h = a
    if GATED:
        h3 = tl.load(h3_ptr + inp, mask=mask, other=0.0).to(tl.float32)
        h = a * h3
    keep = used[:, None]
    out_ty = h_ptr.dtype.element_ty
    tl.store(h_ptr + r64 * stride_h + cols[None, :], tl.where(keep, h, 0.0).to(out_ty), mask=mask)
    if BACKWARD:
        g = tl.load(g_ptr + inp, mask=mask, other=0.0).to(tl.float32)
        g1 = g * _act_grad(h1, ACT_FN)
        gout = r64 * stride_g + cols[None, :]
        if GATED:
            tl.store(g3_ptr + gout, tl.where(keep, g * a, 0.0).to(out_ty), mask=mask)
            g1 = g1 * h3
        tl.store(g1_ptr + gout, tl.where(keep, g1, 0.0).to(out_ty), mask=mask)


def _launch(h1, h3, g, offsets, g1, g3, h, activation, backward):
    N, F = h1.shape
    if N == 0:
        return
    h1, h3, g = (None if t is None else t.contiguous() for t in (h1, h3, g))  # one row stride for the inputs
    sizes, opts = launch.for_tensor("glu_rows", h1)
    grid = (triton.cdiv(N, sizes["BLOCK_R"]), triton.cdiv(F, sizes["BLOCK_C"]))
    dummy = h
    glu_rows_kernel[grid](h1, dummy if h3 is None else h3, dummy if g is None else g, offsets,
                          dummy if g1 is None else g1, dummy if g3 is None else g3, h, N, F, offsets.numel() - 1,
                          h1.stride(0), 0 if g1 is None else g1.stride(0), h.stride(0), BACKWARD=backward,
                          GATED=h3 is not None, ACT_FN=ACTS[activation], **sizes, **opts)


def glu_forward(h1, h3, offsets, activation):
    """h [N, F] from pre-activations h1, h3 [N, F] (h3 None: plain FFN); offsets [E+1] i32."""
    h = torch.empty_like(h1)
    _launch(h1, h3, None, offsets, None, None, h, activation, False)
    return h


def glu_backward(g_h, h1, h3, offsets, activation):
    """(g_pre [N, 2F] = [g_h1 | g_h3] (gated) or g_h1 [N, F], h [N, F])."""
    N, F = h1.shape
    g_pre = h1.new_empty(N, 2 * F if h3 is not None else F)
    h = torch.empty_like(h1)
    _launch(h1, h3, g_h, offsets, g_pre[:, :F], None if h3 is None else g_pre[:, F:], h, activation, True)
    return g_pre, h
