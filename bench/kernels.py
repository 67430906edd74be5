"""Gating, routing metadata, permute and unpermute: moec's generated kernels against
the torch-native way (eager and torch.compile), forward and backward, in one run.

Legend: T tokens, D hidden, E experts, K top-k, N = T*K rows, b bytes per element.
Byte models (each input read once, each output written once):
  gating fwd   T*E*b + T*K*8            gating bwd   2*T*E*b + T*K*8
  permute fwd  T*D*b + N*D*b            permute bwd  N*D*b + T*D*b
  unpermute fwd N*D*b + T*D*b + N*8     unpermute bwd T*D*b + 2*N*D*b + N*12
  route        N*4 + N*4
Achieved bandwidth = bytes / median time, shown against a measured device copy.
Inputs are random (never zeros) and rotate through sets larger than L2.

    python bench/kernels.py            # on a GPU; prints one table
    python bench/kernels.py --smoke    # tiny shapes, one call each, any device
"""
import argparse
import os
import sys

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402

import moec  # noqa: E402
from moec.codegen import gating, permute, routing  # noqa: E402

MODELS = {  # name: (D, E, K, score, bias, n_group, topk_group)
    "mixtral": (4096, 8, 2, "softmax", False, 1, 1),
    "qwen3-30b-a3b": (2048, 128, 8, "softmax", False, 1, 1),
    "deepseek-v3": (7168, 256, 8, "sigmoid", True, 8, 4),
}
# the shape of the gating target in PERF_ANCHORS.md (softmax over 256 experts); gating rows only
GATING_ONLY = {"softmax-e256": (7168, 256, 8, "softmax", False, 1, 1)}
DEV = "cuda" if torch.cuda.is_available() else "cpu"
L2_BYTES = 50 * 2 ** 20


def bench(fn, sets):
    """Median ms of fn(*inputs), cycling through input sets so no call finds its data in L2."""
    i = [0]

    def call():
        fn(*sets[i[0] % len(sets)])
        i[0] += 1

    if SMOKE:
        call()
        return float("nan")
    return triton.testing.do_bench(call, warmup=5, rep=25, return_mode="median")


def n_sets(bytes_per_set):
    return 1 if SMOKE else max(1, min(8, -(-3 * L2_BYTES // max(bytes_per_set, 1))))


def row(op, shape, impl, ms, nbytes, copy_tbs):
    tbs = nbytes / (ms * 1e-3) / 1e12
    share = tbs / copy_tbs if copy_tbs else float("nan")
    print(f"| {op} | {shape} | {impl} | {ms:.4f} | {tbs:.3f} | {100 * share:.0f} % |", flush=True)


def copy_bandwidth():
    n = 2 ** 28 if not SMOKE else 2 ** 12  # 512 MiB of bf16
    a = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), [()])
    return 2 * a.numel() * 2 / (ms * 1e-3) / 1e12


def native_gate(logits, k, score, renorm, bias, n_group, topk_group):
    """softmax/sigmoid -> (group-limited) topk -> renorm, the way model code writes it."""
    s = logits.float().softmax(-1) if score == "softmax" else logits.float().sigmoid()
    sel = s if bias is None else s + bias
    if n_group > 1:
        T, E = sel.shape
        gs = sel.view(T, n_group, -1).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(gs).scatter_(1, gs.topk(topk_group, dim=-1).indices, 1.0)
        sel = sel.masked_fill(keep.repeat_interleave(E // n_group, 1) == 0, float("-inf"))
    idx = sel.topk(k, dim=-1).indices
    w = s.gather(1, idx)
    return (w / w.sum(-1, keepdim=True) if renorm else w), idx


def gating_rows(copy_tbs, Ts, names):
    compiled = torch.compile(native_gate, dynamic=True)
    for name, (D, E, K, score, has_bias, G, TG) in {**MODELS, **GATING_ONLY}.items():
        if names and name not in names:
            continue
        cfg = gating.config(torch.bfloat16, E, K, score, True, has_bias, G, TG)
        mod = gating.module(cfg)
        for T in Ts:
            nb = T * E * 2
            sets = []
            for _ in range(n_sets(nb)):
                x = torch.randn(T, E, device=DEV, dtype=torch.bfloat16, requires_grad=True)
                bias = torch.randn(E, device=DEV) * 0.1 if has_bias else None
                sets.append((x, bias))
            args = (K, score, True)
            shape = f"{name} T={T} E={E} K={K}"
            fwd_bytes, bwd_bytes = T * E * 2 + T * K * 8, 2 * T * E * 2 + T * K * 8
            with torch.no_grad():
                row("gating fwd", shape, "torch eager", bench(lambda x, b: native_gate(x, *args, b, G, TG), sets),
                    fwd_bytes, copy_tbs)
                row("gating fwd", shape, "torch.compile",
                    bench(lambda x, b: compiled(x, *args, b, G, TG), sets), fwd_bytes, copy_tbs)
                row("gating fwd", shape, "moec", bench(lambda x, b: mod.forward(x, b), sets), fwd_bytes, copy_tbs)
                if DEV == "cuda":  # the same calls replayed from a CUDA graph: kernel time without host launch cost
                    x, b = sets[0]
                    row("gating fwd", shape, "moec, CUDA graph replay",
                        triton.testing.do_bench_cudagraph(lambda: mod.forward(x, b), return_mode="median"),
                        fwd_bytes, copy_tbs)
            grads = []
            for x, b in sets:
                w, idx = native_gate(x, *args, b, G, TG)
                grads.append((x, w, torch.randn_like(w), idx.int()))
            row("gating bwd", shape, "torch eager",
                bench(lambda x, w, g, i: torch.autograd.grad(w, x, g, retain_graph=True), grads), bwd_bytes, copy_tbs)
            g_p, g_z = torch.randn(E, device=DEV), torch.randn((), device=DEV)
            row("gating bwd", shape, "moec",
                bench(lambda x, w, g, i: mod.backward(x.detach(), i, g, g_p, g_z), grads), bwd_bytes, copy_tbs)


def zipf_indices(T, E, K, skew):
    if skew == 0:
        score = torch.rand(T, E, device=DEV)
    else:
        score = torch.rand(T, E, device=DEV) / torch.arange(1, E + 1, device=DEV).float() ** skew
    return score.topk(K, dim=1).indices.int()


def native_permute(x, src):  # src: [N] token of each buffer row
    return x.index_select(0, src)


def native_unpermute(y, rows, w):  # rows: [N] buffer row of each slot; gather by inverse order + bmm
    T, K = w.shape
    return torch.bmm(w.to(y.dtype).unsqueeze(1), y.index_select(0, rows).view(T, K, -1)).squeeze(1)


def permute_rows(copy_tbs, cases):
    c_perm = torch.compile(native_permute, dynamic=True)
    c_unperm = torch.compile(native_unpermute, dynamic=True)
    for name, T, skew in cases:
        D, E, K = MODELS[name][:3]
        N = T * K
        idx = zipf_indices(T, E, K, skew)
        row_map, offsets = routing.module(routing.config(E, 0)).forward(idx)
        rows = row_map.long()
        src = torch.empty_like(rows)
        src[rows] = torch.arange(N, device=DEV) // K
        shape = f"{name} T={T} D={D} K={K}" + (f" zipf {skew}" if skew else "")
        pm = permute.module(permute.permute_config(torch.bfloat16, K, False))
        um = permute.module(permute.unpermute_config(torch.bfloat16, torch.float32, K, False))
        sets = [(torch.randn(T, D, device=DEV, dtype=torch.bfloat16),
                 torch.randn(N, D, device=DEV, dtype=torch.bfloat16),
                 torch.rand(T, K, device=DEV)) for _ in range(n_sets(N * D * 2))]
        b_perm, b_unperm = T * D * 2 + N * D * 2, N * D * 2 + T * D * 2 + N * 8
        b_unperm_bwd = T * D * 2 + 2 * N * D * 2 + N * 12
        row("permute fwd", shape, "torch eager", bench(lambda x, y, w: native_permute(x, src), sets), b_perm,
            copy_tbs)
        row("permute fwd", shape, "torch.compile", bench(lambda x, y, w: c_perm(x, src), sets), b_perm, copy_tbs)
        row("permute fwd", shape, "moec", bench(lambda x, y, w: pm.forward(x, row_map), sets), b_perm, copy_tbs)
        # permute's backward: sum each token's K rows (index_add in fp32 is autograd's way)
        row("permute bwd", shape, "torch eager",
            bench(lambda x, y, w: torch.zeros(T, D, device=DEV).index_add_(0, src, y.float()).bfloat16(), sets),
            b_perm, copy_tbs)
        row("permute bwd", shape, "moec", bench(lambda x, y, w: pm.backward(y, row_map), sets), b_perm, copy_tbs)
        row("unpermute fwd", shape, "torch eager", bench(lambda x, y, w: native_unpermute(y, rows, w), sets),
            b_unperm, copy_tbs)
        row("unpermute fwd", shape, "torch.compile", bench(lambda x, y, w: c_unperm(y, rows, w), sets), b_unperm,
            copy_tbs)
        row("unpermute fwd", shape, "moec", bench(lambda x, y, w: um.forward(y, row_map, w), sets), b_unperm,
            copy_tbs)
        bw = []
        for x, y, w in sets:
            yg, wg = y.clone().requires_grad_(), w.clone().requires_grad_()
            out = native_unpermute(yg, rows, wg)
            bw.append((yg, wg, out, torch.randn_like(out), y, w))
        row("unpermute bwd", shape, "torch eager",
            bench(lambda yg, wg, o, g, y, w: torch.autograd.grad(o, (yg, wg), g, retain_graph=True), bw),
            b_unperm_bwd, copy_tbs)
        row("unpermute bwd", shape, "moec", bench(lambda yg, wg, o, g, y, w: um.backward(g, y, row_map, w), bw),
            b_unperm_bwd, copy_tbs)
        rm = routing.module(routing.config(E, 0))
        row("route", shape, "moec::route reference", bench(lambda: moec.runtime.ops.routing.route(idx, E, 0), [()]), N * 8,
            copy_tbs)
        row("route", shape, "moec", bench(lambda: rm.forward(idx), [()]), N * 8, copy_tbs)
        del bw, sets
        if DEV == "cuda":
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--only", choices=["gating", "permute"], default=None)
    ap.add_argument("--models", nargs="*", default=None, help=f"a subset of {[*MODELS, *GATING_ONLY]}")
    ap.add_argument("--tokens", nargs="*", type=int, default=None, help="T values (default 4096 16384 65536)")
    args = ap.parse_args()
    Ts = [64] if SMOKE else (args.tokens or [4096, 16384, 65536])
    copy_tbs = copy_bandwidth()
    dev = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    print(f"device: {dev}; torch {torch.__version__}; triton {triton.__version__}; "
          f"copy bandwidth (read + write) {copy_tbs:.2f} TB/s")
    print("| op | shape | impl | median ms | TB/s by byte model | share of copy |")
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    if args.only in (None, "gating"):
        gating_rows(copy_tbs, Ts, args.models)
    if args.only in (None, "permute"):
        models = [m for m in MODELS if not args.models or m in args.models]
        cases = [(m, T, 0) for m in models for T in Ts]
        cases += [(m, Ts[min(1, len(Ts) - 1)], 1.2) for m in models]
        permute_rows(copy_tbs, cases)


if __name__ == "__main__":
    main()
