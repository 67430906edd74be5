"""Training speed of the emitted program on one GPU: an upcycled Llama MoE
(8 experts, top-2, about 1B parameters in all) against the dense Llama with
the same active parameters (its FFN as wide as two experts), both run as the
user would run them (`python BUILD/train.py`), once per --grad-accum value
(micro-batches per optimizer step: the optimizer's pass over the weights is
paid once per step) and per --modes (eager, torch.compile, CUDA graphs), with
each run's peak memory beside the cost model's prediction, then a
torch.profiler breakdown by op of one micro-batch step of each.

    python bench/train_speed.py --out build/speed

MFU counts the model's FLOPs (6 x active params per token + attention) over
the device's bf16 peak (moec.runtime.training.metrics).
"""
import argparse
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MOEC = (sys.executable, "-m", "moec.driver.cli")  # the moec of this interpreter


def sh(*cmd):
    print("$", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def compile_builds(out: Path, args) -> dict:
    model = ROOT / "examples" / "llama.py"
    common = ["--config", args.config, "--set", f"n_layers={args.layers}", "--no-verify", "--force",
              "--max-weights-gb", "8"]
    builds = {"dense": out / "dense", "moe": out / "moe"}
    sh(*MOEC, "compile", model, *common, "--dense", "--set", f"ffn_dim={2 * args.ffn_dim}", "-o", builds["dense"])
    sh(*MOEC, "compile", model, *common, "--set", f"ffn_dim={args.ffn_dim}", "--experts", 8, "--topk", 2,
       "-o", builds["moe"])
    return builds


MODES = {"eager": [], "compile": ["--compile"], "cuda-graphs": ["--cuda-graphs"]}  # train.py's flags for each


def measure(build: Path, args, accum: int, mode: str) -> dict:
    run = build / "runs" / f"speed_{mode}_accum{accum}"
    sh(sys.executable, build / "train.py", "--steps", args.steps, "--batch-size", args.batch_size, "--grad-accum",
       accum, "--seq-len", args.seq_len, "--log-every", args.log_every, "--eval-every", 0, "--eval-batches", 1,
       "--ckpt-every", -1, "--warmup", 5, "--run-dir", run, *MODES[mode])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if r["kind"] == "train"][1:]  # the first window holds the warm-up steps
    result = json.loads((build / "config.json").read_text())["result"]
    peak = max(r["peak_memory_gib"] or 0.0 for r in records if r["kind"] == "train") * 2**30
    return {"params": result["params"], "active": result["active_params"],
            "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
            "mfu": sum(r["mfu"] for r in steady) / len(steady) if steady[0]["mfu"] is not None else None,
            "loss": steady[-1]["lm_loss"], "peak_bytes": peak}


def predicted_peak(args, name: str, accum: int) -> float:
    """The cost model's peak bytes for the build on one GPU (the formulas `moec plan` ranks plans by)."""
    from moec.base.options import Options
    from moec.cost_model import single_gpu_prediction
    from moec.driver.model_shape import shape_from_model
    width = 2 * args.ffn_dim if name == "dense" else args.ffn_dim
    shape = shape_from_model(str(ROOT / "examples" / "llama.py"), args.config, args.seq_len,
                             overrides={"n_layers": args.layers, "ffn_dim": width})
    moe = Options(dense=True) if name == "dense" else Options(experts=8, topk=2)
    return single_gpu_prediction(shape, moe, args.hardware, args.batch_size, micro_batches=accum).peak_memory_bytes


def profile(build: Path, args) -> str:
    """Forward, backward and AdamW steps of the build under torch.profiler, op by op."""
    rt = importlib.import_module("moec.runtime")
    spec = importlib.util.spec_from_file_location(f"model_{build.name}", build / "model.py")
    emitted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emitted)
    model = rt.load_build(emitted.Model, build, "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    tokens = torch.randint(0, 256, (args.batch_size, args.seq_len + 1), device="cuda")

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            out = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(out["logits"].float().flatten(0, 1), tokens[:, 1:].flatten())
        (loss + out.get("aux_loss", 0.0) + out.get("z_loss", 0.0)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile_rows,
                                      max_name_column_width=60)
    # which tensors the casts move: weights (autocast), activations, or logits
    copies = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::copy_"]
    copies.sort(key=lambda e: -e.device_time_total)
    lines = [f"{e.device_time_total / 1e3:9.2f} ms  x{e.count:<4d} {e.input_shapes}" for e in copies[:12]]
    return table + "\naten::copy_ by input shapes (CUDA time, 3 steps):\n" + "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "build" / "speed"))
    p.add_argument("--config", default="1b")
    p.add_argument("--layers", type=int, default=3, help="3 layers of the 1b config: 1.0B params with 8 experts")
    p.add_argument("--ffn-dim", type=int, default=5632, help="expert width; the dense FFN is twice this")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--grad-accum", type=int, nargs="+", default=[1, 4],
                   help="micro-batches per optimizer step, one pair of runs each")
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=list(MODES),
                   help="how train.py runs the step: as it is, under torch.compile, or replayed from CUDA graphs")
    p.add_argument("--hardware", default="dgx_h100", help="the cost model's profile for the predicted peak memory")
    p.add_argument("--profile-rows", type=int, default=20)
    args = p.parse_args()
    builds = compile_builds(Path(args.out), args)
    rows = {(name, mode, a): measure(path, args, a, mode)
            for a in args.grad_accum for mode in args.modes for name, path in builds.items()}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{device}; torch {torch.__version__}; llama --config {args.config} n_layers={args.layers}; micro-batch "
          f"{args.batch_size} x {args.seq_len} tokens; bf16 autocast; {args.steps} steps, the first {args.log_every} "
          f"left out; peak memory is the run's, predicted is the cost model's ({args.hardware})\n")
    print("| model | mode | params | active params | grad accum | tokens/s | MFU | peak GiB | predicted GiB | "
          "peak bytes / param | peak bytes / token |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (name, mode, a), r in rows.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"| {name} | {mode} | {r['params'] / 1e9:.2f} B | {r['active'] / 1e9:.2f} B | {a} | "
              f"{r['tokens_per_s']:,.0f} | {mfu} | {r['peak_bytes'] / 2**30:.1f} | "
              f"{predicted_peak(args, name, a) / 2**30:.1f} | {r['peak_bytes'] / r['params']:.1f} | "
              f"{r['peak_bytes'] / (args.batch_size * args.seq_len):,.0f} |")
    for a in args.grad_accum:
        for mode in args.modes:
            ratio = rows[("moe", mode, a)]["tokens_per_s"] / rows[("dense", mode, a)]["tokens_per_s"]
            print(f"\nMoE / dense tokens/s at grad accum {a}, {mode}: {ratio:.2f}")
        for name in builds:
            fastest = max(args.modes, key=lambda m: rows[(name, m, a)]["tokens_per_s"])
            print(f"{name}, grad accum {a}: fastest {fastest}")
    if torch.cuda.is_available():
        backend = importlib.import_module("moec.runtime.ops.experts").select_backend(
            torch.empty(1, device="cuda", dtype=torch.bfloat16))
        print(f"\nmoec::experts backend for bf16 on this GPU: {backend}")
        for name in ("dense", "moe"):
            print(f"\n{name} profile, 3 steps:\n" + profile(builds[name], args))


if __name__ == "__main__":
    main()
