"""Whole MoE layer benchmark: gate, route, permute, experts, unpermute and the
load-balancing loss, forward+backward, moec against the torch-native way in one run.

    python bench/moe_layer.py [--cases mixtral:16384,qwen3:16384,deepseek:16384,qwen3:32768]

moec: torch.ops.moec gate/route/permute/unpermute (the generated Triton ops of
codegen/gating.py, routing.py and permute.py when they load, else the
reference ops; the run prints which) and moec::experts with each GPU backend.
Torch-native (torchtitan style): softmax top-k, argsort permute with
index_select, torch._grouped_mm, index_add unpermute in fp32.
Both: bf16 SwiGLU experts, softmax top-k with renormalised weights, dropless.
TFLOP/s count useful FLOPs: router 2*T*D*E plus experts 6*T*K*D*F forward,
three times that forward+backward.
"""
import argparse
import sys

import torch
import torch.nn.functional as Fn
import triton
from triton.testing import do_bench

import moec

SHAPES = {"mixtral": (4096, 14336, 8, 2), "qwen3": (2048, 768, 128, 8), "deepseek": (7168, 2048, 256, 8)}


def kernels(E, K):
    """The gate/route/permute/unpermute callables moec uses, and their names."""
    ops = {"gate": torch.ops.moec.gate, "route": torch.ops.moec.route, "permute": torch.ops.moec.permute,
           "unpermute": torch.ops.moec.unpermute}
    names = {k: "reference" for k in ops}
    try:
        from moec.codegen import gating, permute, routing

        made = {"gate": gating.module(gating.config(torch.bfloat16, E, K, "softmax", True, False, 1, 1)),
                "route": routing.module(routing.config(E, 0)),
                "permute": permute.module(permute.permute_config(torch.bfloat16, K, False)),
                "unpermute": permute.module(permute.unpermute_config(torch.bfloat16, torch.float32, K, False))}
        for k, mod in made.items():
            ops[k], names[k] = mod.OP, "generated Triton"
    except Exception as exc:  # the generated ops are another part's work; fall back to the reference ops
        print(f"generated kernels unavailable ({type(exc).__name__}: {exc}); using reference ops", flush=True)
    return ops, names


def moec_layer(p, ops, K, backend):
    x = p["x"]
    T, E = x.shape[0], p["wr"].shape[0]
    logits = x @ p["wr"].t()  # [T, E]
    weights, indices, counts, probs_sum, _ = ops["gate"](logits, K, "softmax", True, None, 1, 1)
    row_map, offsets = ops["route"](indices, E, 0)
    buf = ops["permute"](x, row_map, K)  # [T*K, D]
    y = torch.ops.moec.experts(buf, offsets, p["w1"], None, p["w3"], None, p["w2"], None, "silu", False, backend)
    out = ops["unpermute"](y, row_map, weights)  # [T, D]
    aux = E * (counts.float() / (T * K) * probs_sum / T).sum()
    return out, aux


def native_layer(p, K):
    x = p["x"]
    T, E = x.shape[0], p["wr"].shape[0]
    probs = (x @ p["wr"].t()).float().softmax(-1)  # [T, E]
    w, idx = probs.topk(K, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    tok = order // K
    counts = torch.bincount(flat, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    buf = x.index_select(0, tok)  # [T*K, D]
    h = Fn.silu(torch._grouped_mm(buf, p["w1"].transpose(1, 2), offs=offs)) * torch._grouped_mm(
        buf, p["w3"].transpose(1, 2), offs=offs)
    y = torch._grouped_mm(h, p["w2"].transpose(1, 2), offs=offs)
    out = torch.zeros(T, x.shape[1], device=x.device, dtype=torch.float32).index_add_(
        0, tok, y.float() * w.flatten()[order].unsqueeze(1)).to(x.dtype)
    aux = E * (counts.float() / (T * K) * probs.mean(0)).sum()
    return out, aux


def step(layer, p):
    out, aux = layer()
    leaves = [p[k] for k in ("x", "wr", "w1", "w3", "w2")]
    return torch.autograd.grad([out, aux], leaves, [p["gy"], torch.ones_like(aux)])


def peak_gib(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="mixtral:16384,qwen3:16384,deepseek:16384,qwen3:32768")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, used = [], None
    for case in args.cases.split(","):
        name, T = case.split(":")
        T = int(T)
        D, F, E, K = SHAPES[name]
        ops, used = kernels(E, K)
        mk = lambda *s, scale: (torch.randn(*s, device="cuda", generator=gen) * scale).bfloat16().requires_grad_()
        p = dict(x=mk(T, D, scale=1.0), wr=mk(E, D, scale=D ** -0.5), w1=mk(E, F, D, scale=D ** -0.5),
                 w3=mk(E, F, D, scale=D ** -0.5), w2=mk(E, D, F, scale=F ** -0.5))
        p["gy"] = torch.randn(T, D, device="cuda", generator=gen).bfloat16()
        flops = 3 * (2 * T * D * E + 6 * T * K * D * F)
        variants = {"torch-native": lambda: native_layer(p, K),
                    "moec, experts=triton": lambda: moec_layer(p, ops, K, "triton"),
                    "moec, experts=grouped_mm": lambda: moec_layer(p, ops, K, "grouped_mm")}
        ref_out = native_layer(p, K)[0]
        res = {}
        for v, layer in variants.items():
            err = ((layer()[0].float() - ref_out.float()).norm() / ref_out.float().norm()).item()
            ms = do_bench(lambda: step(layer, p), return_mode="median")
            mem = peak_gib(lambda: step(layer, p))
            res[v] = ms
            print(f"{name} T={T} {v}: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s, peak {mem:.2f} GiB, "
                  f"out rel. err vs native {err:.1e}", flush=True)
            rows.append((name, T, v, ms, flops / ms / 1e9, mem))
        best = min(res[v] for v in variants if v != "torch-native")
        print(f"  moec fastest / torch-native speedup: {res['torch-native'] / best:.2f}x", flush=True)
        del p, ref_out
        torch.cuda.empty_cache()
    print(f"\n{dev}, torch {torch.__version__}, triton {triton.__version__}; moec gate/route/permute/unpermute: "
          + ", ".join(f"{k} {v}" for k, v in used.items()))
    print("| shape | T | layer | fwd+bwd ms | TFLOP/s | peak memory GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.0f} | {r[5]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
