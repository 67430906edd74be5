"""Generators of token permute and unpermute kernels (moec::permute, moec::unpermute).

Legend: T tokens, D hidden, K top-k, N = T*K rows of the expert-grouped buffer.

Every kernel is a wide row copy: a program owns a block of tokens and a block
of D (grid tokens x D), moves rows contiguous in D, and touches each token's
row once. Forward kernels use no atomics.
  permute      x [T, D] -> buffer [N, D]: read each token once, write its K rows.
  gather-sum   buffer [N, D] -> [T, D]: out[t] = sum_k w[t,k] * y[row_map[t*K+k]],
               in fp32. With unit weights it is permute's backward.
  unpermute backward: g_y rows = w * g_out[t], g_w[t,k] = <g_out[t], y[row]>;
               a program loops over D so the dot products need no atomics.
Row -1 (a slot dropped by capacity) is skipped; then buffer rows past the kept
ones are zero, so such modules zero-fill their [N, D] outputs first. Dropless
modules need not: every row is written.

Roofline (bytes, b per element): permute T*D*b + N*D*b; gather-sum N*D*b +
T*D*b (+ N*4 weights); unpermute backward T*D*b + 2*N*D*b (+ N*8).
"""
import functools
from dataclasses import dataclass
from string import Template

import moec
from moec.runtime.kernels import launch
from moec.codegen.source import (BY_NAME, CAST_TO, DTYPES, REGISTER_GUARD, dtype_name, load, next_pow2)


@dataclass(frozen=True)
class PermuteConfig:
    """No dtype: the kernels cast through their pointers' element types, so one module
    serves bf16, fp16 and fp32 rows (Triton specialises on them at launch). A build
    compiled in fp32 trains under bf16 autocast, where the experts hand unpermute
    bf16 rows: the same module runs both."""
    op: str  # "permute" or "unpermute"
    k: int
    may_drop: bool  # row_map can hold -1 (capacity set, or its producer unknown)

    @property
    def name(self) -> str:
        return f"{self.op}_k{self.k}" + ("_drop" if self.may_drop else "")


def permute_config(x_dtype, k: int, may_drop: bool) -> PermuteConfig:
    if k < 1:
        raise moec.MoecError(f"permute got top-k {k}: it must be at least 1")
    dtype_name(x_dtype, "permute's tokens")
    return PermuteConfig("permute", k, bool(may_drop))


def unpermute_config(y_dtype, weights_dtype, k: int, may_drop: bool) -> PermuteConfig:
    if k < 1:
        raise moec.MoecError(f"unpermute got top-k {k}: it must be at least 1")
    dtype_name(y_dtype, "unpermute's expert outputs")
    dtype_name(weights_dtype, "unpermute's routing weights")
    return PermuteConfig("unpermute", k, bool(may_drop))


_GATHER = Template('''
@triton.jit
def gather_sum_kernel(y_ptr, row_map_ptr, w_ptr, out_ptr, T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [T]
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [D]
    ok = (t[:, None] < T) & (d[None, :] < D)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for j in tl.static_range($K):
        row = tl.load(row_map_ptr + t * $K + j, mask=t < T, other=-1)  # [T]
        v = tl.load(y_ptr + row[:, None].to(tl.int64) * D + d[None, :], mask=ok & (row[:, None] >= 0), other=0.0)
        $ACCUMULATE
    tl.store(out_ptr + t[:, None].to(tl.int64) * D + d[None, :], cast_to(acc, out_ptr.dtype.element_ty), mask=ok)


def gather_sum(y: Tensor, row_map: Tensor, weights) -> Tensor:
    """[N, D] -> [T, D]: sum over each token's K rows (weighted when weights is a tensor)."""
    y = y.contiguous()
    T, D = row_map.numel() // K, y.shape[1]
    out = y.new_empty(T, D)
    if T == 0 or D == 0:
        return out.zero_()
    sizes, opts = launch.for_tensor("gather_sum", y)
    bd = min(sizes["BLOCK_D"], triton.next_power_of_2(D))
    w = weights.contiguous() if weights is not None else row_map
    grid = (triton.cdiv(T, sizes["BLOCK_T"]), triton.cdiv(D, bd))
    gather_sum_kernel[grid](y, row_map.contiguous(), w, out, T, D, BLOCK_T=sizes["BLOCK_T"], BLOCK_D=bd, **opts)
    return out
''')

_PERMUTE = Template('''
@triton.jit
def permute_kernel(x_ptr, row_map_ptr, out_ptr, T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [T]
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [D]
    ok = (t[:, None] < T) & (d[None, :] < D)
    v = tl.load(x_ptr + t[:, None].to(tl.int64) * D + d[None, :], mask=ok)  # [T, D], read once
    for j in tl.static_range($K):
        row = tl.load(row_map_ptr + t * $K + j, mask=t < T, other=-1)  # [T]
        tl.store(out_ptr + row[:, None].to(tl.int64) * D + d[None, :], v, mask=ok & (row[:, None] >= 0))


def forward(x: Tensor, row_map: Tensor) -> Tensor:
    """Triton path of the op: tokens [T, D] -> buffer [T*K, D]."""
    x = x.contiguous()
    T, D = x.shape
    out = $ALLOC(T * K, D)
    if T == 0 or D == 0:
        return out
    sizes, opts = launch.for_tensor("permute", x)
    bd = min(sizes["BLOCK_D"], triton.next_power_of_2(D))
    grid = (triton.cdiv(T, sizes["BLOCK_T"]), triton.cdiv(D, bd))
    permute_kernel[grid](x, row_map.contiguous(), out, T, D, BLOCK_T=sizes["BLOCK_T"], BLOCK_D=bd, **opts)
    return out


def backward(g_out: Tensor, row_map: Tensor) -> Tensor:
    return gather_sum(g_out, row_map, None)



def _register():
    @torch.library.custom_op(f"moec_kernels::{NAME}", mutates_args=(), device_types="cuda")
    def permute(x: Tensor, row_map: Tensor, k: int) -> Tensor:
        if not _generated_for(k, x.dtype):
            return torch.ops.moec.permute.default(x, row_map, k)
        return forward(x, row_map)

    @permute.register_kernel("cpu")
    def _(x, row_map, k):
        return torch.ops.moec.permute.default(x, row_map, k)

    permute.register_fake(lambda x, row_map, k: x.new_empty(x.shape[0] * k, x.shape[1]))

    @torch.library.custom_op(f"moec_kernels::{NAME}_backward", mutates_args=(), device_types="cuda")
    def permute_backward(g_out: Tensor, row_map: Tensor, k: int) -> Tensor:
        if not _generated_for(k, g_out.dtype):
            return moec.runtime.ops.routing.permute_backward(g_out, row_map, k)
        return backward(g_out, row_map)

    permute_backward.register_kernel("cpu")(moec.runtime.ops.routing.permute_backward)

    permute_backward.register_fake(lambda g_out, row_map, k: g_out.new_empty(row_map.numel() // k, g_out.shape[1]))

    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.k = inputs[2]

    def bwd(ctx, g_out):
        (row_map,) = ctx.saved_tensors
        return permute_backward(g_out.contiguous(), row_map, ctx.k), None, None

    permute.register_autograd(bwd, setup_context=setup)
    # as moec::permute: the experts take bf16 under autocast, so the T tokens are cast, not the T*K rows
    permute.register_autocast("cuda", torch.bfloat16)
''')

_UNPERMUTE = Template('''
@triton.jit
def unpermute_bwd_kernel(g_out_ptr, y_ptr, row_map_ptr, w_ptr, g_y_ptr, g_w_ptr, T, D, BLOCK_T: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [T]
    kc = tl.arange(0, $KP)[None, :]  # [1, K]
    dots = tl.zeros([BLOCK_T, $KP], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)  # [D]
        ok = (t[:, None] < T) & (d[None, :] < D)
        g = tl.load(g_out_ptr + t[:, None].to(tl.int64) * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
        for j in tl.static_range($K):
            row = tl.load(row_map_ptr + t * $K + j, mask=t < T, other=-1)  # [T]
            w = tl.load(w_ptr + t * $K + j, mask=t < T, other=0.0).to(tl.float32)
            at = row[:, None].to(tl.int64) * D + d[None, :]
            live = ok & (row[:, None] >= 0)
            y = tl.load(y_ptr + at, mask=live, other=0.0).to(tl.float32)
            tl.store(g_y_ptr + at, cast_to(g * w[:, None], g_y_ptr.dtype.element_ty), mask=live)
            dots += tl.where(kc == j, tl.sum(g * y, 1)[:, None], 0.0)
    tl.store(g_w_ptr + t[:, None] * $K + kc, cast_to(dots, g_w_ptr.dtype.element_ty),
             mask=(t[:, None] < T) & (kc < $K))


def forward(y: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
    """Triton path of the op: buffer [T*K, D], weights [T, K] -> [T, D]."""
    return gather_sum(y, row_map, weights)


def backward(g_out: Tensor, y: Tensor, row_map: Tensor, weights: Tensor):
    g_out, y = g_out.contiguous(), y.contiguous()
    T, D = weights.shape[0], y.shape[1]
    g_y, g_w = $ALLOC(*y.shape), torch.empty_like(weights)
    if T == 0:
        return g_y, g_w
    if D == 0:
        return g_y, g_w.zero_()
    sizes, opts = launch.for_tensor("unpermute_bwd", y)
    bd = min(sizes["BLOCK_D"], triton.next_power_of_2(D))
    unpermute_bwd_kernel[(triton.cdiv(T, sizes["BLOCK_T"]),)](
        g_out, y, row_map.contiguous(), weights.contiguous(), g_y, g_w, T, D, BLOCK_T=sizes["BLOCK_T"], BLOCK_D=bd,
        **opts)
    return g_y, g_w


def _register():
    @torch.library.custom_op(f"moec_kernels::{NAME}", mutates_args=(), device_types="cuda")
    def unpermute(y: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
        if not _generated_for(weights.shape[1], y.dtype):
            return torch.ops.moec.unpermute.default(y, row_map, weights)
        return forward(y, row_map, weights)

    @unpermute.register_kernel("cpu")
    def _(y, row_map, weights):
        return torch.ops.moec.unpermute.default(y, row_map, weights)

    unpermute.register_fake(lambda y, row_map, weights: y.new_empty(weights.shape[0], y.shape[1]))

    @torch.library.custom_op(f"moec_kernels::{NAME}_backward", mutates_args=(), device_types="cuda")
    def unpermute_backward(g_out: Tensor, y: Tensor, row_map: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        if not _generated_for(weights.shape[1], y.dtype):
            return torch.ops.moec.unpermute_backward.default(g_out, y, row_map, weights)
        return backward(g_out, y, row_map, weights)

    @unpermute_backward.register_kernel("cpu")
    def _(g_out, y, row_map, weights):
        return torch.ops.moec.unpermute_backward.default(g_out, y, row_map, weights)

    unpermute_backward.register_fake(lambda g_out, y, row_map, weights: (torch.empty_like(y),
                                                                         torch.empty_like(weights)))

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def bwd(ctx, g_out):
        y, row_map, weights = ctx.saved_tensors
        g_y, g_w = unpermute_backward(g_out.contiguous(), y, row_map, weights)
        return g_y, None, g_w

    unpermute.register_autograd(bwd, setup_context=setup)
''')

_HEAD = Template('''\
"""Generated by moec (codegen/permute.py): $OP, K=$K, $DROP_DESC; bf16, fp16 or fp32 rows.

Matches moec::$OP and its backward (moec/runtime/ops/routing.py): copies exactly; sums over
the K rows of a token in fp32, equal to the reference to fp32 rounding.
Legend: T tokens, D hidden, K top-k, N = T*K buffer rows.
Bytes (b per element): permute T*D*b + N*D*b; gather-sum N*D*b + T*D*b;
unpermute backward T*D*b + 2*N*D*b.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

import moec
from moec.runtime.kernels import launch

NAME = "$NAME"
K = $K



def _generated_for(k: int, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels fit this call; float64 runs the moec:: reference."""
    if k != K:
        raise moec.MoecError(f"{NAME} was generated for K={K}, not {k}: re-run lower_to_triton")
    return dtype in (torch.bfloat16, torch.float16, torch.float32)
''')


@functools.lru_cache(maxsize=None)
def source(cfg: PermuteConfig) -> str:
    alloc = "{x}.new_zeros" if cfg.may_drop else "{x}.new_empty"
    x = "x" if cfg.op == "permute" else "y"
    head = _HEAD.substitute(
        OP=cfg.op, K=cfg.k, NAME=cfg.name,
        DROP_DESC="row -1 skipped and unused rows zero" if cfg.may_drop else "dropless (every buffer row written)")
    weighted = f"acc += v.to(tl.float32) * tl.load(w_ptr + t * {cfg.k} + j, mask=t < T, other=0.0).to(tl.float32)[:, None]"
    gather = _GATHER.substitute(K=cfg.k, ACCUMULATE=weighted if cfg.op == "unpermute" else "acc += v.to(tl.float32)")
    if cfg.op == "permute":
        body = _PERMUTE.substitute(K=cfg.k, ALLOC=alloc.format(x=x))
    else:
        body = _UNPERMUTE.substitute(K=cfg.k, ALLOC=alloc.format(x=x), KP=next_pow2(cfg.k))
    return head + CAST_TO + gather + "\n" + body + REGISTER_GUARD


def module(cfg: PermuteConfig):
    return load(cfg.name, source(cfg))


# (configuration, rows' dtype, routing weights' dtype)
PORTABLE = (
    (PermuteConfig("permute", 2, False), "bf16", "fp32"),
    (PermuteConfig("permute", 8, True), "fp32", "fp32"),
    (PermuteConfig("unpermute", 8, False), "bf16", "fp32"),
    (PermuteConfig("unpermute", 3, True), "fp32", "fp32"),
    (PermuteConfig("unpermute", 2, False), "fp16", "fp32"),
)


def portable_specs(arch_name: str = "sm90") -> list:
    """(name, jit_fn, signature, constexprs, launch_options) of every kernel of PORTABLE, for cross_compile.compile_for."""
    specs = []
    for cfg, rows, weights in PORTABLE:
        mod = module(cfg)
        p, w = DTYPES[BY_NAME[rows]][1], DTYPES[BY_NAME[weights]][1]
        kernels = [("gather_sum", mod.gather_sum_kernel, [p, "*i32", w, p, "i32", "i32"])]
        kernels += ([("permute", mod.permute_kernel, [p, "*i32", p, "i32", "i32"])] if cfg.op == "permute" else
                    [("unpermute_bwd", mod.unpermute_bwd_kernel, [p, p, "*i32", w, p, w, "i32", "i32"])])
        for kernel, fn, sig in kernels:
            sizes, opts = launch.split(launch.launch(kernel, arch_name))
            names = fn.arg_names
            aligned = [n for n, t in zip(names, sig) if t.startswith("*")] + ["D"]
            specs.append((f"{cfg.name}_{rows}.{kernel}", fn, dict(zip(names, sig + ["constexpr"] * 2)),
                          {"BLOCK_T": sizes["BLOCK_T"], "BLOCK_D": sizes["BLOCK_D"]}, dict(opts, aligned=aligned)))
    return specs
