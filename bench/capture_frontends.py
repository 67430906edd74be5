"""Capture time and peak memory of the two front-ends on the same models.

A GPT-shaped dense model (RMSNorm, GELU FFN, no attention: capture cost is per
node and per parameter, and attention adds neither kind of difficulty here) at
7B and 70B shapes, built on the meta device, captured three ways, each in a
fresh process:
  export    moec's capture, non-strict torch.export (the model as written)
  fallback  the torch.fx.symbolic_trace front-end on the same model
  opaque    the fallback on a variant export rejects: its norm is a torch.library
            operator without a fake kernel, kept opaque
"""
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {"7b": (4096, 11008, 32), "70b": (8192, 28672, 80)}  # dim, FFN width, layers


@torch.library.custom_op("moecbench::rmsnorm", mutates_args=())
def opaque_rmsnorm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


class Block(nn.Module):
    def __init__(self, dim, width, opaque):
        super().__init__()
        self.norm, self.opaque = nn.Parameter(torch.ones(dim)), opaque
        self.up, self.down = nn.Linear(dim, width, bias=False), nn.Linear(width, dim, bias=False)

    def forward(self, x):
        h = opaque_rmsnorm(x, self.norm) if self.opaque else F.rms_norm(x, x.shape[-1:], self.norm)
        return x + self.down(F.gelu(self.up(h)))


class Model(nn.Module):
    def __init__(self, dim, width, layers, opaque, vocab=32000):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, width, opaque) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def one(size: str, how: str) -> None:
    from moec.driver.capture import capture
    from moec.driver.fx_frontend import symbolic_capture
    with torch.device("meta"):
        model = Model(*SIZES[size], opaque=how == "opaque")
    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    t = time.perf_counter()
    gm = symbolic_capture(model, (ids,)) if how == "fallback" else capture(model, (ids,))
    seconds = time.perf_counter() - t
    frontend = gm.meta.get("frontend", "torch.fx.symbolic_trace")
    print(f"{seconds:.2f} {len(gm.graph.nodes)} {frontend}")


def main():
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}\n")
    print("| model | front-end | graph nodes | capture time | process peak RSS |")
    print("| --- | --- | ---: | ---: | ---: |")
    for size in SIZES:
        for how in ("export", "fallback", "opaque"):
            pid = subprocess.Popen([sys.executable, __file__, "--one", size, how], stdout=subprocess.PIPE, text=True)
            out = pid.stdout.read().split()
            _, status, usage = os.wait4(pid.pid, 0)
            if status != 0:
                raise SystemExit(f"{size} {how} failed")
            seconds, nodes, frontend = float(out[0]), int(out[1]), out[2]
            label = {"export": "torch.export", "fallback": "symbolic_trace",
                     "opaque": "symbolic_trace, opaque norm"}[how]
            assert (frontend == "torch.export") == (how == "export"), frontend
            print(f"| {size} | {label} | {nodes:,} | {seconds:.1f} s | {usage.ru_maxrss / 2**20:.2f} GiB |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        one(*sys.argv[2:4])
    else:
        main()
