"""Expert GEMM benchmark: moec::experts' backends side by side in one run.

    python bench/experts.py [--shapes mixtral,qwen3,deepseek] [--dtype bf16|fp32] [--sweep]

Per shape and routing (uniform, Zipf), forward and forward+backward of the
gated SwiGLU experts over M = T*K routed rows, for the per-expert loop
("reference"), torch._grouped_mm ("grouped_mm") and moec's Triton grouped GEMM
("triton"). TFLOP/s count useful FLOPs only: forward 6*M*D*F (three GEMMs),
forward+backward 18*M*D*F. Before timing, each fast backend's output and
gradients are checked against the loop (relative L2 error). --sweep also times
candidate Triton tile configurations per kernel (for moec/runtime/kernels/launch.py's LAUNCH).
--dtype fp32 times the loop and Triton only (torch._grouped_mm takes bf16 alone); Triton's
float32 dot runs in TF32 there.
"""
import argparse
import sys

import torch
import triton
from triton.testing import do_bench

import moec
from moec.runtime.kernels import grouped_gemm as gg, launch
from moec.runtime.kernels.grouped_gemm_glu import glu_backward

# name: D, F, E, K, T
SHAPES = {"mixtral": (4096, 14336, 8, 2, 16384), "qwen3": (2048, 768, 128, 8, 16384),
          "deepseek": (7168, 2048, 256, 8, 8192)}
BACKENDS = ("reference", "grouped_mm", "triton")


def route(T, E, K, routing, gen):
    """offsets [E+1] i32 of T tokens each choosing K distinct experts; Zipf(1) popularity when skewed."""
    p = torch.ones(E, device="cuda")
    if routing == "zipf":
        p = 1.0 / torch.arange(1, E + 1, device="cuda", dtype=torch.float32)
        p = p[torch.randperm(E, device="cuda", generator=gen)]
    idx = torch.multinomial(p.expand(T, E), K, replacement=False, generator=gen)
    counts = torch.bincount(idx.flatten(), minlength=E)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)


def tensors(D, F, E, M, gen, dtype):
    mk = lambda *s, scale: (torch.randn(*s, device="cuda", generator=gen) * scale).to(dtype).requires_grad_()
    return dict(x=mk(M, D, scale=1.0), w1=mk(E, F, D, scale=D ** -0.5), w3=mk(E, F, D, scale=D ** -0.5),
                w2=mk(E, D, F, scale=F ** -0.5), gy=torch.randn(M, D, device="cuda", generator=gen).to(dtype))


def call(t, offsets, backend):
    return moec.runtime.ops.experts.experts(t["x"], offsets, t["w1"], None, t["w3"], None, t["w2"], None, "silu",
                                backend=backend)


def fwd_bwd(t, offsets, backend):
    y = call(t, offsets, backend)
    return y, torch.autograd.grad(y, [t["x"], t["w1"], t["w3"], t["w2"]], t["gy"])


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(t, offsets, backends, experts=32):
    """Largest relative error of output and gradients against the loop, per fast backend,
    on the first `experts` experts (the rows of the rest become the unused tail, which
    must come out zero): full-size gradients of every backend at once do not fit."""
    E = min(experts, t["w1"].shape[0])
    sub = dict(t, **{k: t[k][:E].detach().requires_grad_() for k in ("w1", "w3", "w2")})
    offsets = offsets[:E + 1]
    y_ref, g_ref = fwd_bwd(sub, offsets, "reference")
    errs = {}
    for b in backends[1:]:
        y, g = fwd_bwd(sub, offsets, b)
        assert y[int(offsets[-1]):].abs().sum() == 0, f"{b}: unused rows not zero"
        errs[b] = max([rel(y, y_ref)] + [rel(a, r) for a, r in zip(g, g_ref)])
        del y, g
    return errs


def sweep(t, offsets, D, F, E, M):
    """Time each Triton kernel under candidate tile configs; prints TFLOP/s per config."""
    x, w1, w3, w2 = (t[k].detach() for k in ("x", "w1", "w3", "w2"))
    h = torch.randn(M, F, device="cuda").bfloat16()
    g = t["gy"]
    cands = {
        "grouped_mm_glu": [(128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 32, 5, 8)],
        "grouped_mm": [(128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (128, 256, 32, 5, 8), (256, 128, 64, 3, 8)],
        "grouped_wgrad": [(128, 256, 32, 4, 8), (128, 256, 32, 3, 8), (256, 128, 32, 4, 8), (128, 128, 32, 5, 8)],
    }
    pre1, pre3 = torch.empty(M, F, device="cuda", dtype=torch.bfloat16), torch.empty_like(h)
    out_f = torch.empty_like(h)
    out_d = torch.empty_like(x)
    g_pre = torch.empty(M, 2 * F, device="cuda", dtype=torch.bfloat16)
    runs = {
        "grouped_mm_glu": [("fwd glu", 4 * M * D * F, lambda: gg.grouped_mm(
            gg.GLU, x, w1.transpose(1, 2), offsets, out_f, b2=w3.transpose(1, 2), pre=pre1, pre2=pre3,
            save_pre=True)),
            ("bwd glu", 2 * M * D * F, lambda: gg.grouped_mm(gg.GLU_BWD, g, w2, offsets, g_pre, pre=pre1,
                                                            pre2=pre3, h=out_f))],
        "grouped_mm": [("fwd down", 2 * M * D * F, lambda: gg.grouped_mm(gg.MM, h, w2.transpose(1, 2), offsets,
                                                                         out_d)),
                       ("bwd dx", 4 * M * D * F, lambda: gg.grouped_mm(gg.SUM2, g_pre[:, :F], w1, offsets, out_d,
                                                                       a2=g_pre[:, F:], b2=w3)),
                       ("bwd dH + glu kernel", 2 * M * D * F, lambda: glu_backward(
                           gg.grouped_mm(gg.MM, g, w2, offsets, out_f) or out_f, pre1, pre3, offsets, "silu"))],
        "grouped_wgrad": [("wgrad w1", 2 * M * D * F, lambda: gg.grouped_wgrad(g_pre[:, :F], x, offsets)),
                          ("wgrad w2", 2 * M * D * F, lambda: gg.grouped_wgrad(g, h, offsets))],
    }
    saved = {k: dict(launch.LAUNCH[k]["sm90"]) for k in cands}
    for kernel, configs in cands.items():
        for bm, bn, bk, st, nw in configs:
            launch.LAUNCH[kernel]["sm90"] = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=nw,
                                               num_stages=st)
            cells = []
            for label, flops, fn in runs[kernel]:
                try:
                    ms = do_bench(fn, return_mode="median")
                    cells.append(f"{label} {flops / ms / 1e9:6.1f}")
                except Exception as exc:  # a config that does not fit shared memory
                    cells.append(f"{label} failed ({type(exc).__name__})")
            print(f"  sweep {kernel} {bm}x{bn}x{bk} s{st} w{nw}: " + ", ".join(cells), flush=True)
        launch.LAUNCH[kernel]["sm90"] = saved[kernel]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--routings", default="uniform,zipf")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--sweep", action="store_true", help="bf16 only")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    backends = BACKENDS if dtype == torch.bfloat16 else ("reference", "triton")
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}, triton {triton.__version__}; {args.dtype}, SwiGLU; TFLOP/s of "
          f"useful FLOPs (fwd 6*M*D*F, fwd+bwd 18*M*D*F), do_bench medians", flush=True)
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in args.shapes.split(","):
        D, F, E, K, T = SHAPES[name]
        M = T * K
        t = tensors(D, F, E, M, gen, dtype)
        for routing in args.routings.split(","):
            offsets = route(T, E, K, routing, gen)
            top = int((offsets[1:] - offsets[:-1]).max())
            errs = check(t, offsets, backends)
            print(f"{name} {routing}: M={M}, largest expert {top} rows; rel. error vs loop: "
                  + ", ".join(f"{b} {e:.2e}" for b, e in errs.items()), flush=True)
            if args.sweep and routing == "uniform" and dtype == torch.bfloat16:
                sweep(t, offsets, D, F, E, M)
            res = {}
            for b in backends:
                with torch.no_grad():
                    res[("fwd", b)] = do_bench(lambda: call(t, offsets, b), return_mode="median")
                res[("fwd+bwd", b)] = do_bench(lambda: fwd_bwd(t, offsets, b), return_mode="median")
            for mode, flops in (("fwd", 6 * M * D * F), ("fwd+bwd", 18 * M * D * F)):
                tf = {b: flops / res[(mode, b)] / 1e9 for b in backends}
                rows.append((name, routing, M, mode, tf["reference"], tf.get("grouped_mm"), tf["triton"]))
                print(f"  {mode}: " + ", ".join(f"{b} {tf[b]:.1f}" for b in backends), flush=True)
        del t
        torch.cuda.empty_cache()
    print(f"\n{dev}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}")
    print("| shape | routing | M | pass | per-expert loop | torch._grouped_mm | moec Triton | Triton / grouped_mm |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, routing, M, mode, loop, grouped, tri in rows:
        ratio = f"{tri / grouped:.0%}" if grouped else "-"
        print(f"| {name} | {routing} | {M} | {mode} | {loop:.0f} | {f'{grouped:.0f}' if grouped else '-'} | "
              f"{tri:.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
