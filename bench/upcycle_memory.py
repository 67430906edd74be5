"""Memory of upcycling at load time: compile peak RSS, build dir size against the dense checkpoint, and a
rank's start-up RSS, against what the whole-MoE build (every expert made at compile time, one model.safetensors
in float32 that every rank read whole) would take.

Real weights (CPU): a dense checkpoint of --config saved in bf16, compiled to --experts, then
train.py's load (moec.runtime.load_build) for EP rank 0 at each --ep, each in a fresh process (peak RSS from
the kernel's accounting of that child). Sizes only (the meta device; the build's recipe gives every expert
tensor's shape): --meta-config to each of --meta-experts.

    python bench/upcycle_memory.py --config 1b --experts 64,8 --topk 8,2 --ep 64,32/8
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "examples" / "llama.py"
GIB = 2**30

SAVE_DENSE = """
import importlib.util, sys, torch
from safetensors.torch import save_file
spec = importlib.util.spec_from_file_location("llama", sys.argv[1]); mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
model = mod.build_model(sys.argv[2])
save_file({n: t.to(torch.bfloat16).contiguous() for n, t in model.state_dict().items()}, sys.argv[3])
"""

# a checkpoint too large to build in fp32 here: random bf16 tensors of the model's shapes (the values do not
# change the memory), written one at a time from the model declared on the meta device
SAVE_DENSE_STREAMED = """
import importlib.util, sys, torch
from moec.base import safetensors_io
spec = importlib.util.spec_from_file_location("llama", sys.argv[1]); mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
with torch.device("meta"):
    model = mod.build_model(sys.argv[2])
state = model.state_dict()
def fetch(name):
    return (torch.randn(state[name].shape) * 0.02).to(torch.bfloat16)
safetensors_io.save(state, sys.argv[3], {n: torch.bfloat16 for n in state}, fetch)
"""

LOAD_RANK = """
import importlib.util, json, sys
from pathlib import Path
import moec.runtime as rt
build, ep, j = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
spec = importlib.util.spec_from_file_location("model", build / "model.py"); mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
if ep == 0:  # the interpreter, torch and the model's declaration: what every rank holds before its weights
    mod.Model(device="meta"); print(json.dumps({})); sys.exit()
model = rt.load_build(mod.Model, build, "cpu", ep, j)
tensors = dict(model.named_parameters()) | dict(model.named_buffers())
experts = sum(t.numel() * t.element_size() for n, t in tensors.items() if ".experts." in n)
print(json.dumps({"experts": experts, "rest": sum(t.numel() * t.element_size() for t in tensors.values()) - experts}))
"""


def child(args: list) -> tuple[float, float, str]:
    """(seconds, peak RSS in GiB, stdout) of a fresh process."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0:
        raise SystemExit(f"{args[:3]} failed:\n{out[-3000:]}")
    return time.perf_counter() - t, usage.ru_maxrss / 2**20, out


def real(config: str, experts: int, topk: int, eps: list[int], work: Path) -> list[str]:
    dense = work / "dense.safetensors"
    if not dense.exists():
        child(["-c", SAVE_DENSE, LLAMA, config, dense])
    build = work / f"build{experts}"
    seconds, rss, out = child(["-m", "moec.driver.cli", "compile", LLAMA, "--config", config, "--experts", experts,
                               "--topk", topk, "--weights", dense, "--force", "-o", build])
    result = json.loads((build / "config.json").read_text())["result"]
    dense_bytes, size = dense.stat().st_size, sum(p.stat().st_size for p in build.rglob("*") if p.is_file())
    _, base, _ = child(["-c", LOAD_RANK, build, 0, 0])
    rows = [f"| {config} -> {experts} experts, top-{topk} | {result['moe_weights_bytes'] / 1e9:,.1f} GB MoE "
            f"(fp32), dense checkpoint {dense_bytes / 1e9:.2f} GB (bf16) | compile | {seconds:.0f} s | "
            f"{rss:.2f} GiB ({rss * GIB / dense_bytes:.2f}x the dense checkpoint) |",
            f"| | | build dir | | {size / 1e9:.2f} GB ({size / dense_bytes:.3f}x the dense checkpoint; "
            f"the whole-MoE build: {result['moe_weights_bytes'] / 1e9:,.1f} GB) |"]
    for ep in eps:
        seconds, rss, out = child(["-c", LOAD_RANK, build, ep, 0])
        held = json.loads(out.strip().splitlines()[-1])
        bound = base + (held["rest"] + held["experts"]) / GIB
        rows.append(f"| | | rank start-up, EP={ep} ({experts // ep} of {experts} experts a layer) | {seconds:.0f} s | "
                    f"{rss:.2f} GiB (non-expert {held['rest'] / GIB:.2f} + its experts {held['experts'] / GIB:.2f} + "
                    f"runtime {base:.2f} = {bound:.2f} GiB) |")
    return rows


def big(config: str, experts: int, topk: int, work: Path) -> list[str]:
    """The compile of a checkpoint too large for its dense model to be built here in fp32 (no rank start-up:
    a rank holds the dense model in fp32 and its experts)."""
    dense = work / f"dense-{config}.safetensors"
    if not dense.exists():
        child(["-c", SAVE_DENSE_STREAMED, LLAMA, config, dense])
    build = work / f"build-{config}-{experts}"
    seconds, rss, out = child(["-m", "moec.driver.cli", "compile", LLAMA, "--config", config, "--experts", experts,
                               "--topk", topk, "--weights", dense, "--max-weights-gb", "64", "--force", "-o", build])
    result = json.loads((build / "config.json").read_text())["result"]
    dense_bytes, size = dense.stat().st_size, sum(p.stat().st_size for p in build.rglob("*") if p.is_file())
    return [f"| {config} -> {experts} experts, top-{topk} | {result['moe_weights_bytes'] / 1e9:,.1f} GB MoE "
            f"(fp32), dense checkpoint {dense_bytes / 1e9:.2f} GB (bf16, random) | compile | {seconds:.0f} s | "
            f"{rss:.2f} GiB ({rss * GIB / dense_bytes:.2f}x the dense checkpoint) |",
            f"| | | build dir | | {size / 1e9:.2f} GB ({size / dense_bytes:.3f}x the dense checkpoint) |"]


def meta(config: str, experts: int, topk: int, eps: list[int]) -> list[str]:
    """Sizes from the meta compile's recipe: the build (dense tensors in bf16, routers in fp32), and what a
    rank holds (the dense model and its experts, in fp32)."""
    import torch

    from moec.base.options import Options
    from moec.codegen.program import stored_bytes, weights
    from moec.driver.capture import build, capture, example_inputs, load_module
    from moec.driver.pipeline import passes_for, run_pipeline

    o = Options(experts=experts, topk=topk, config=config)
    mod = load_module(str(LLAMA))
    model = build(mod, o.entry, o.config, o.overrides, "meta")
    dense_bf16 = sum(t.numel() * 2 for t in model.state_dict().values())
    gm, _ = run_pipeline(capture(model, example_inputs(mod, model, 2, 16, "meta")), passes_for(o), None,
                         lambda *a: None)
    recipe = gm.meta["upcycle"]
    stored = stored_bytes(gm, {n: torch.bfloat16 for n in weights(gm) if ".moe.router." not in n})
    stored += len(json.dumps(recipe, indent=1))
    params = dict(gm.named_parameters()) | dict(gm.named_buffers())
    routed = [n for n in recipe if ".experts." in n]  # what EP divides; shared experts every rank holds
    expert_bytes = sum(params[n].numel() * 4 for n in routed)
    rest = sum(t.numel() * t.element_size() for n, t in params.items() if n not in routed)
    rows = [f"| {config} -> {experts} experts, top-{topk} (meta) | {(expert_bytes + rest) / 1e9:,.1f} GB MoE (fp32), "
            f"dense checkpoint {dense_bf16 / 1e9:.1f} GB (bf16) | build dir | | {stored / 1e9:.1f} GB "
            f"({stored / dense_bf16:.3f}x the dense checkpoint; the whole-MoE build: "
            f"{(expert_bytes + rest) / 1e9:,.1f} GB) |"]
    for ep in eps:
        if experts % ep == 0:
            rows.append(f"| | | rank's weights, EP={ep} ({experts // ep} of {experts} experts a layer) | | "
                        f"{(rest + expert_bytes / ep) / GIB:,.1f} GiB (non-expert {rest / GIB:.1f} + its experts "
                        f"{expert_bytes / ep / GIB:,.1f}) |")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="1b")
    p.add_argument("--experts", default="64", help="expert counts, each compiled from the one checkpoint")
    p.add_argument("--topk", default="8", help="a top-k for each expert count")
    p.add_argument("--ep", default="64,32", help="EP sizes whose rank 0 start-up is measured, a list for each "
                                                  "expert count, the lists split by /")
    p.add_argument("--big-config", default="", help="a config compiled from a checkpoint written without "
                                                     "building its model (e.g. 7b), to --big-experts")
    p.add_argument("--big-experts", default="8")
    p.add_argument("--meta-config", default="7b")
    p.add_argument("--meta-experts", default="8,64")
    p.add_argument("--meta-ep", default="1,8,64")
    p.add_argument("--work", default=None, help="where the dense checkpoint and the build go (default: a temp dir)")
    a = p.parse_args()
    rows = ["| model | weights | what | time | memory / size |", "| --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        for experts, topk, eps in zip(a.experts.split(","), a.topk.split(","), a.ep.split("/")):
            if a.config and experts:
                rows += real(a.config, int(experts), int(topk), [int(e) for e in eps.split(",")], Path(a.work or tmp))
        for experts in (int(e) for e in a.big_experts.split(",") if e and a.big_config):
            rows += big(a.big_config, experts, 2 if experts <= 8 else 8, Path(a.work or tmp))
    for experts in (int(e) for e in a.meta_experts.split(",") if e and a.meta_config):
        rows += meta(a.meta_config, experts, 2 if experts <= 8 else 8, [int(e) for e in a.meta_ep.split(",")])
    print(textwrap.dedent("\n".join(rows)))


if __name__ == "__main__":
    main()
