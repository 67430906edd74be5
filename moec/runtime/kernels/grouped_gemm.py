"""Portable Triton grouped GEMM for moec::experts: the expert FFN's GEMMs over
the expert-grouped buffer, forward and backward, on any GPU Triton targets.

Legend: N rows of the grouped buffer, D hidden, F expert ffn width, E experts,
KD the contraction length of one GEMM, NO its output width.

Tile scheduler: no host sync. Virtual m-tile v of segment e (e < E an expert,
e = E the unused tail [offsets[E], N)) is numbered from
base[e] = e + offsets[e] // BLOCK_M; since base[e+1] - base[e] >= cdiv(rows of e,
BLOCK_M), every real tile gets a number and at most E + 2 + N // BLOCK_M
numbers exist, so the grid is known from shapes alone. A program finds its
segment by counting base[e] <= v over all E+1 offsets (one vector load), and
exits if its tile lies past the segment's end. Tail tiles write zeros.

Roofline (bf16, useful FLOPs): a GEMM over all rows costs 2*N*KD*NO FLOPs and
moves at least 2*(N*KD + E*KD*NO + N*NO) bytes; at the benchmark shapes
arithmetic intensity is several hundred FLOP/byte, so the kernels are bound by
the matrix units, except weight gradients with few rows per expert, which are
bound by writing the E*KD*NO gradient.
"""
import torch
import triton
import triton.language as tl

from moec.runtime.kernels import launch

ACTS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
# MODE of grouped_mm_kernel: what the epilogue does with acc = A @ B[e]
MM, ACT, GLU, SUM2, GLU_BWD, ACT_BWD = (tl.constexpr(i) for i in range(6))


@triton.jit
def _act(h, ACT_FN: tl.constexpr):
    if ACT_FN == 0:
        y = tl.maximum(h, 0.0)
    elif ACT_FN == 1:
        y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT_FN == 2:
        u = 2.0 * tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h)) - 1.0  # tanh via sigmoid
        y = 0.5 * h * (1.0 + u)
    else:
        y = h * tl.sigmoid(h)
    return y


@triton.jit
def _act_grad(h, ACT_FN: tl.constexpr):
    if ACT_FN == 0:
        g = tl.where(h > 0.0, 1.0, 0.0)
    elif ACT_FN == 1:
        g = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476)) + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
    elif ACT_FN == 2:
        c = 0.7978845608028654
        u = 2.0 * tl.sigmoid(2.0 * c * (h + 0.044715 * h * h * h)) - 1.0
        g = 0.5 * (1.0 + u) + 0.5 * h * (1.0 - u * u) * c * (1.0 + 3.0 * 0.044715 * h * h)
    else:
        s = tl.sigmoid(h)
        g = s * (1.0 + h * (1.0 - s))
    return g


@triton.jit
def _locate(offs_ptr, v, N, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Virtual m-tile v -> (segment, first row, end row of the segment)."""
    idx = tl.arange(0, E_POW2)
    starts = tl.load(offs_ptr + idx, mask=idx <= E, other=0)
    base = tl.where(idx <= E, idx + starts // BLOCK_M, 2147483647)
    e = tl.sum((base <= v).to(tl.int32), axis=0) - 1
    start = tl.load(offs_ptr + e)
    end = tl.load(offs_ptr + e + 1, mask=e < E, other=N)
    row0 = start + (v - (e + start // BLOCK_M)) * BLOCK_M
    return e, row0, end


@triton.jit
def grouped_mm_kernel(
        a_ptr, a2_ptr, b_ptr, b2_ptr, bias_ptr, bias2_ptr, offs_ptr, c_ptr, pre_ptr, pre2_ptr, h_ptr,
        N, NO, KD, E, M_TILES, stride_am, stride_be, stride_b, stride_biase, stride_cm, stride_pm, stride_hm,
        B_NK: tl.constexpr, MODE: tl.constexpr, ACT_FN: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_PRE: tl.constexpr,
        WRITE_OUT: tl.constexpr, EVEN_K: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Per expert e, for its rows r: acc = A[r] @ B[e], then by MODE (below).
    A rows are contiguous (row stride stride_am); B[e] is [KD, NO], stored
    [NO, KD] row-major when B_NK (a Linear weight read transposed in place),
    else [KD, NO] row-major; stride_b is its row stride, stride_be its expert stride.

    MM      c = acc (+ bias)
    ACT     c = act(acc + b1); pre = acc + b1
    GLU     c = act(acc + b1) * (A[r] @ B2[e] + b3); pre = acc + b1, pre2 = A @ B2 + b3
    SUM2    c = acc + A2[r] @ B2[e]
    GLU_BWD with h1 = pre, h3 = pre2: c = [acc * h3 * act'(h1) | acc * act(h1)], h = act(h1) * h3
    ACT_BWD with h1 = pre: c = acc * act'(h1), h = act(h1)
    The column halves of c are NO apart; pre and pre2 share the row stride stride_pm."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(NO, BLOCK_N)
    in_group = GROUP_M * n_tiles
    first_m = (pid // in_group) * GROUP_M
    group_m = min(M_TILES - first_m, GROUP_M)
    v = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m

    e, row0, end = _locate(offs_ptr, v, N, E, BLOCK_M, E_POW2)
    if row0 >= end:
        return
    rows = row0 + tl.arange(0, BLOCK_M)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < end
    col_ok = cols < NO
    out_mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    TWO_OUT: tl.constexpr = MODE == GLU_BWD
    if e == E:  # unused tail rows come out zero
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty)
        if WRITE_OUT:
            tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :], zero, mask=out_mask)
            if TWO_OUT:
                tl.store(c_ptr + rows64[:, None] * stride_cm + NO + cols[None, :], zero, mask=out_mask)
        if SAVE_PRE:
            tl.store(pre_ptr + rows64[:, None] * stride_pm + cols[None, :], zero, mask=out_mask)
            if MODE == GLU:
                tl.store(pre2_ptr + rows64[:, None] * stride_pm + cols[None, :], zero, mask=out_mask)
        if MODE >= GLU_BWD:
            tl.store(h_ptr + rows64[:, None] * stride_hm + cols[None, :], zero, mask=out_mask)
        return

    # rows past the segment read clamped (valid) addresses and are masked at the store; columns are
    # masked on load, which keeps loads along a contiguous column axis vectorized
    a_rows = tl.minimum(rows, N - 1).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :]  # [BM, BK]
    if B_NK:
        b_off = e.to(tl.int64) * stride_be + ks[:, None] + cols[None, :] * stride_b  # [BK, BN]
        b_step = BLOCK_K
    else:
        b_off = e.to(tl.int64) * stride_be + ks[:, None] * stride_b + cols[None, :]
        b_step = BLOCK_K * stride_b
    b_ptrs = b_ptr + b_off
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MODE == GLU:
        b2_ptrs = b2_ptr + b_off
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(KD, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b_mask = col_ok[None, :]
        else:
            k_ok = ks + k * BLOCK_K < KD
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b_mask = k_ok[:, None] & col_ok[None, :]
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc)
        if MODE == GLU:
            b2 = tl.load(b2_ptrs, mask=b_mask, other=0.0)
            acc2 = tl.dot(a, b2, acc2)
            b2_ptrs += b_step
        a_ptrs += BLOCK_K
        b_ptrs += b_step
    if MODE == SUM2:
        a_ptrs = a2_ptr + a_rows[:, None] * stride_am + ks[None, :]
        b_ptrs = b2_ptr + b_off
        for k in range(0, tl.cdiv(KD, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b_mask = col_ok[None, :]
            else:
                k_ok = ks + k * BLOCK_K < KD
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                b_mask = k_ok[:, None] & col_ok[None, :]
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += b_step

    if HAS_BIAS:
        bias_off = e.to(tl.int64) * stride_biase + cols
        acc += tl.load(bias_ptr + bias_off, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if MODE == GLU:
            acc2 += tl.load(bias2_ptr + bias_off, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rows64[:, None] * stride_cm + cols[None, :]
    pre_off = rows64[:, None] * stride_pm + cols[None, :]
    pre_ptrs = pre_ptr + pre_off
    out_ty = c_ptr.dtype.element_ty
    if MODE == MM or MODE == SUM2:
        tl.store(c_ptrs, acc.to(out_ty), mask=out_mask)
    elif MODE == ACT or MODE == GLU:
        if SAVE_PRE:
            tl.store(pre_ptrs, acc.to(out_ty), mask=out_mask)
            if MODE == GLU:
                tl.store(pre2_ptr + pre_off, acc2.to(out_ty), mask=out_mask)
        if WRITE_OUT:
            # round the pre-activations as they are saved, so a backward from them sees the same h
            h = _act(acc.to(out_ty).to(tl.float32), ACT_FN)
            if MODE == GLU:
                h = h * acc2.to(out_ty).to(tl.float32)
            tl.store(c_ptrs, h.to(out_ty), mask=out_mask)
    else:
        h1 = tl.load(pre_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        a1 = _act(h1, ACT_FN)
        g1 = acc * _act_grad(h1, ACT_FN)
        h_ptrs = h_ptr + rows64[:, None] * stride_hm + cols[None, :]
        if MODE == GLU_BWD:
            h3 = tl.load(pre2_ptr + pre_off, mask=out_mask, other=0.0).to(tl.float32)
            tl.store(c_ptrs, (g1 * h3).to(out_ty), mask=out_mask)
            tl.store(c_ptrs + NO, (acc * a1).to(out_ty), mask=out_mask)
            tl.store(h_ptrs, (a1 * h3).to(out_ty), mask=out_mask)
        else:
            tl.store(c_ptrs, g1.to(out_ty), mask=out_mask)
            tl.store(h_ptrs, a1.to(out_ty), mask=out_mask)


@triton.jit
def grouped_wgrad_kernel(a_ptr, b_ptr, offs_ptr, c_ptr, M1, M2, E, stride_an, stride_bn, stride_ce, stride_cm,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    """C[e] = A[r]^T @ B[r] over expert e's rows r: A [N, M1], B [N, M2], C [E, M1, M2].
    Rows of A and B are contiguous (row strides stride_an, stride_bn). An expert
    with no rows gets zeros."""
    pid = tl.program_id(0)
    t1 = tl.cdiv(M1, BLOCK_M)
    t2 = tl.cdiv(M2, BLOCK_N)
    e = pid // (t1 * t2)
    t = pid % (t1 * t2)
    in_group = GROUP_M * t2
    first_m = (t // in_group) * GROUP_M
    group_m = min(t1 - first_m, GROUP_M)
    pid_m = first_m + (t % in_group) % group_m
    pid_n = (t % in_group) // group_m
    start = tl.load(offs_ptr + e)
    end = tl.load(offs_ptr + e + 1)
    m1 = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m2 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_ptrs = a_ptr + (start + ks[:, None]).to(tl.int64) * stride_an + m1[None, :]  # [BK, BM]
    b_ptrs = b_ptr + (start + ks[:, None]).to(tl.int64) * stride_bn + m2[None, :]  # [BK, BN]
    for i in range(0, tl.cdiv(end - start, BLOCK_K)):
        r_ok = ks < end - start - i * BLOCK_K
        a = tl.load(a_ptrs, mask=r_ok[:, None] & (m1 < M1)[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=r_ok[:, None] & (m2 < M2)[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc)
        a_ptrs += BLOCK_K * stride_an
        b_ptrs += BLOCK_K * stride_bn
    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + m1[:, None].to(tl.int64) * stride_cm + m2[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(m1 < M1)[:, None] & (m2 < M2)[None, :])


def _config(kernel: str, device, blocks: dict | None, elem_size: int, b_tiles: int = 1) -> tuple[dict, dict]:
    """(constexpr block sizes, compile options) of a kernel on the device's arch, for inputs of elem_size
    bytes (b_tiles: B tiles loaded per step, 2 for the GLU forward)."""
    arch = launch.arch_of(device)
    row = launch.launch(kernel, arch)
    row.update(blocks or {})
    if device.type != "cuda":
        return launch.split(row)[0], {}  # the interpreter takes no compile options
    consts, opts = launch.split(launch.fit_shared(row, arch, elem_size, b_tiles))
    opts.pop("split_bwd", None)  # a choice of the caller's, not a Triton option
    return consts, opts


def split_bwd(device) -> bool:
    """Whether backward runs dH as a plain GEMM plus the elementwise GLU kernel
    (kernels/grouped_gemm_glu.py) instead of the fused GLU_BWD epilogue: a
    per-arch choice in LAUNCH["grouped_mm_glu"], set by measurement."""
    return bool(launch.launch("grouped_mm_glu", launch.arch_of(device)).get("split_bwd", False))


def grouped_mm(mode, a, b, offsets, c, *, a2=None, b2=None, bias=None, bias2=None, pre=None, pre2=None, h=None,
               activation="silu", save_pre=False, write_out=True, blocks=None):
    """Launch grouped_mm_kernel. a [N, KD] with contiguous rows, b [E, KD, NO] with
    KD or NO contiguous, c [N, NO] (or [N, 2*NO] in GLU_BWD), pre, pre2 and h [N, NO];
    a2/b2/pre2 laid out as a/b/pre."""
    N, KD = a.shape
    E, _, NO = b.shape
    if N == 0:
        return
    b_nk = b.stride(1) == 1
    kernel = "grouped_mm_glu" if mode in (GLU, GLU_BWD) else "grouped_mm"
    cfg, opts = _config(kernel, a.device, blocks, a.element_size(), 2 if mode == GLU else 1)
    m_tiles = E + 2 + N // cfg["BLOCK_M"]
    grid = (m_tiles * triton.cdiv(NO, cfg["BLOCK_N"]),)
    dummy = c
    grouped_mm_kernel[grid](
        a, dummy if a2 is None else a2, b, dummy if b2 is None else b2, dummy if bias is None else bias,
        dummy if bias2 is None else bias2, offsets, c, dummy if pre is None else pre,
        dummy if pre2 is None else pre2, dummy if h is None else h,
        N, NO, KD, E, m_tiles,
        a.stride(0), b.stride(0), b.stride(2 if b_nk else 1), 0 if bias is None else bias.stride(0),
        c.stride(0), 0 if pre is None else pre.stride(0), 0 if h is None else h.stride(0),
        B_NK=b_nk, MODE=mode, ACT_FN=ACTS[activation], HAS_BIAS=bias is not None, SAVE_PRE=save_pre, WRITE_OUT=write_out,
        EVEN_K=KD % cfg["BLOCK_K"] == 0, E_POW2=triton.next_power_of_2(E + 1), **cfg, **opts)


def grouped_wgrad(a, b, offsets, blocks=None):
    """[E, M1, M2] = per expert, A[rows]^T @ B[rows]; a [N, M1], b [N, M2], rows contiguous."""
    N, M1 = a.shape
    M2 = b.shape[1]
    E = offsets.numel() - 1
    c = a.new_empty(E, M1, M2)
    if E == 0:
        return c
    cfg, opts = _config("grouped_wgrad", a.device, blocks, a.element_size())
    grid = (E * triton.cdiv(M1, cfg["BLOCK_M"]) * triton.cdiv(M2, cfg["BLOCK_N"]),)
    grouped_wgrad_kernel[grid](a, b, offsets, c, M1, M2, E, a.stride(0), b.stride(0), c.stride(0), c.stride(1),
                               **cfg, **opts)
    return c


def segment_sum(t, offsets):
    """[E, C] float32: per expert, the sum of its rows of t [N, C]; no host sync."""
    E = offsets.numel() - 1
    rows = torch.arange(t.shape[0], device=t.device, dtype=offsets.dtype)
    seg = torch.searchsorted(offsets[1:].contiguous(), rows, right=True)  # tail rows land in E
    return torch.zeros(E + 1, t.shape[1], device=t.device, dtype=torch.float32).index_add_(0, seg, t.float())[:E]


def experts_forward(x, offsets, w1, b1, w3, b3, w2, b2, activation, save_pre, blocks=None):
    """moec::experts forward: out [N, D], and when save_pre the pre-activations
    h1 = x W1^T + b1 and (gated) h3 = x W3^T + b3, each [N, F], else Nones."""
    N, _ = x.shape
    F = w1.shape[1]
    gated = w3 is not None
    h = x.new_empty(N, F)
    h1 = x.new_empty(N, F) if save_pre else None
    h3 = x.new_empty(N, F) if save_pre and gated else None
    grouped_mm(GLU if gated else ACT, x, w1.transpose(1, 2), offsets, h, b2=None if w3 is None else w3.transpose(1, 2),
               bias=b1, bias2=b3, pre=h1, pre2=h3, activation=activation, save_pre=save_pre, blocks=blocks)
    out = x.new_empty(N, w2.shape[1])
    grouped_mm(MM, h, w2.transpose(1, 2), offsets, out, bias=b2, blocks=blocks)
    return out, h1, h3


def experts_backward(g, x, offsets, w1, b1, w3, b3, w2, b2, activation, h1=None, h3=None, blocks=None):
    """Gradients [x, w1, b1, w3, b3, w2, b2] (None for absent tensors) from g [N, D]
    (contiguous); h1, h3 as experts_forward saved them, or None to recompute here."""
    N, D = x.shape
    F = w1.shape[1]
    gated = w3 is not None
    if h1 is None:
        h1 = x.new_empty(N, F)
        h3 = x.new_empty(N, F) if gated else None
        grouped_mm(GLU if gated else ACT, x, w1.transpose(1, 2), offsets, h1,
                   b2=None if w3 is None else w3.transpose(1, 2), bias=b1, bias2=b3, pre=h1, pre2=h3,
                   activation=activation, save_pre=True, write_out=False, blocks=blocks)
    if split_bwd(x.device):
        from moec.runtime.kernels.grouped_gemm_glu import glu_backward

        g_h = x.new_empty(N, F)
        grouped_mm(MM, g, w2, offsets, g_h, blocks=blocks)
        g_pre, h = glu_backward(g_h, h1, h3, offsets, activation)
    else:
        g_pre = x.new_empty(N, 2 * F if gated else F)  # [g_h1 | g_h3] or g_h1
        h = x.new_empty(N, F)
        grouped_mm(GLU_BWD if gated else ACT_BWD, g, w2, offsets, g_pre, pre=h1, pre2=h3, h=h,
                   activation=activation, blocks=blocks)
    g_x = torch.empty_like(x)
    g_h1, g_h3 = (g_pre[:, :F], g_pre[:, F:]) if gated else (g_pre, None)
    grouped_mm(SUM2 if gated else MM, g_h1, w1, offsets, g_x, a2=g_h3, b2=w3, blocks=blocks)
    g_w1 = grouped_wgrad(g_h1, x, offsets, blocks)
    g_w3 = grouped_wgrad(g_h3, x, offsets, blocks) if gated else None
    g_w2 = grouped_wgrad(g, h, offsets, blocks)
    bias_grad = lambda b, t: None if b is None else segment_sum(t, offsets).to(b.dtype)
    return [g_x, g_w1, bias_grad(b1, g_h1), g_w3, bias_grad(b3, g_h3), g_w2, bias_grad(b2, g)]


def _signature(fn, dtype: str, ints: list, consts: list) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ints:
            sig[name] = "i32"
        else:
            sig[name] = "*i32" if name == "offs_ptr" else f"*{dtype}"
    return sig


def _options(row: dict, fn, ints: list) -> dict:
    """Compile options of a spec: the row's lowercase keys, and the arguments a
    launch at the benchmark shapes passes 16-divisible (compile_for's "aligned")."""
    opts = {k: v for k, v in row.items() if not k.isupper()}
    opts["aligned"] = tuple(n for n in fn.arg_names if n.endswith("_ptr") or n in ints)
    return opts


def portable_specs(arch_name: str = "sm90") -> list:
    """(name, jit_fn, signature, constexprs, launch_options) for the configurations
    moec::experts runs (bf16; SwiGLU and plain GELU FFN; E=128, D and F multiples
    of 16), with arch_name's launch settings, for cross-compiling with moec.codegen.cross_compile.compile_for."""
    mm_ints = ["N", "NO", "KD", "E", "M_TILES", "stride_am", "stride_be", "stride_b", "stride_biase", "stride_cm",
               "stride_pm", "stride_hm"]
    mm_consts = ["B_NK", "MODE", "ACT_FN", "HAS_BIAS", "SAVE_PRE", "WRITE_OUT", "EVEN_K", "E_POW2", "BLOCK_M",
                 "BLOCK_N", "BLOCK_K", "GROUP_M"]
    divisible = [n for n in mm_ints if n not in ("N", "E", "M_TILES")]
    specs = []
    for name, mode, b_nk, act in [("fwd_mm", MM, True, "silu"), ("fwd_glu_silu", GLU, True, "silu"),
                                  ("fwd_act_gelu", ACT, True, "gelu"), ("bwd_sum2", SUM2, False, "silu"),
                                  ("bwd_mm", MM, False, "gelu"), ("bwd_glu_silu", GLU_BWD, False, "silu"),
                                  ("bwd_act_gelu", ACT_BWD, False, "gelu")]:
        row = launch.launch("grouped_mm_glu" if mode in (GLU, GLU_BWD) else "grouped_mm", arch_name)
        consts = {k: v for k, v in row.items() if k.isupper()}
        consts.update(B_NK=b_nk, MODE=mode.value, ACT_FN=ACTS[act], HAS_BIAS=False,
                      SAVE_PRE=mode in (ACT, GLU), WRITE_OUT=True, EVEN_K=True, E_POW2=256)
        specs.append((f"grouped_mm_{name}", grouped_mm_kernel, _signature(grouped_mm_kernel, "bf16", mm_ints, mm_consts),
                      consts, _options(row, grouped_mm_kernel, divisible)))
    row = launch.launch("grouped_wgrad", arch_name)
    w_ints = ["M1", "M2", "E", "stride_an", "stride_bn", "stride_ce", "stride_cm"]
    w_consts = ["BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"]
    specs.append(("grouped_wgrad", grouped_wgrad_kernel, _signature(grouped_wgrad_kernel, "bf16", w_ints, w_consts),
                  {k: v for k, v in row.items() if k.isupper()},
                  _options(row, grouped_wgrad_kernel, [n for n in w_ints if n != "E"])))
    from moec.runtime.kernels.grouped_gemm_glu import glu_rows_kernel

    g_ints = ["N", "F", "E", "stride_in", "stride_g", "stride_h"]
    g_consts = ["BACKWARD", "GATED", "ACT_FN", "BLOCK_R", "BLOCK_C"]
    specs.append(("glu_rows_bwd_silu", glu_rows_kernel, _signature(glu_rows_kernel, "bf16", g_ints, g_consts),
                  dict(BACKWARD=True, GATED=True, ACT_FN=ACTS["silu"], BLOCK_R=16, BLOCK_C=256),
                  dict(num_warps=4, aligned=tuple(n for n in glu_rows_kernel.arg_names
                                                  if n.endswith("_ptr") or n in ("F", "stride_in", "stride_g",
                                                                                 "stride_h")))))
    return specs
