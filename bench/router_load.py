"""Expert load after upcycling, per router initialisation and balancing option: how evenly do the MoE
layers route from the first step on?

1. compile --model (examples/gpt.py) dense and train it --base-steps (hidden states of a trained model
   share a large mean direction, which is what sends every token to one expert); --base-steps 0 upcycles
   the model's random initialisation instead;
2. upcycle those weights with each variant's compile flags and train --steps more, logging every step;
3. print, per variant, the worst layer's expert load max/mean at the chosen steps (1.0 is even; with
   8 experts top-2, 4.0 means every token's slots go to the same two experts), and its worst over all
   steps.

    python bench/router_load.py --out build/router-load
    python bench/router_load.py --model examples/llama.py --config 1b --base-steps 0 --batch-size 4 \
        --seq-len 2048 --device cuda --flags --max-weights-gb 24 --no-verify      # one GPU
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MOEC = (sys.executable, "-m", "moec.driver.cli")
CENTERED_BIAS = ["--router-init", "centered", "--expert-bias-rate", "1e-3"]
VARIANTS = {  # label: (compile flags, train.py flags)
    "defaults": ([], []),
    "random": (["--router-init", "random", "--expert-bias-rate", "0"], []),
    "centered": (["--router-init", "centered", "--expert-bias-rate", "0"], []),
    "kmeans": (["--router-init", "kmeans", "--expert-bias-rate", "0"], []),
    "centered, bias 1e-3, no refit": (CENTERED_BIAS, ["--bias-refit", "0"]),
    "centered, bias 1e-3, refit": (CENTERED_BIAS, []),
    "centered, bias 1e-3, refit forward": (CENTERED_BIAS, ["--bias-refit-forward"]),
    "centered, bias 1e-2, no refit": (["--router-init", "centered", "--expert-bias-rate", "1e-2"], ["--bias-refit", "0"]),
    "kmeans, bias 1e-2, no refit": (["--router-init", "kmeans", "--expert-bias-rate", "1e-2"], ["--bias-refit", "0"]),
}
SHOWN = (1, 2, 5, 10, 20, 50, 100, 200)


def sh(*cmd):
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL)


def train(build: Path, run: Path, steps: int, every: int, args, flags=()):
    sh(sys.executable, build / "train.py", "--steps", steps, "--batch-size", args.batch_size, "--seq-len",
       args.seq_len, "--grad-accum", args.grad_accum, "--lr", args.lr, "--eval-every", 0, "--log-every", every,
       "--ckpt-every", -1,
       "--device", args.device, "--run-dir", run, *flags)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "build" / "router-load"))
    p.add_argument("--model", default=str(ROOT / "examples" / "gpt.py"))
    p.add_argument("--config", default="tiny")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--base-steps", type=int, default=100)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="compile flags every variant gets (last)")
    p.add_argument("--experts-label", default=None, help="how the table names the layer shape")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--target", type=float, default=1.3, help="the table counts the steps whose worst layer is above it")
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", action="store_true", help="keep each variant's build and final weights")
    args = p.parse_args()
    out = Path(args.out)
    if out.exists():
        sys.exit(f"{out} exists; pass another --out")
    weights = []
    if args.base_steps:
        sh(*MOEC, "compile", args.model, "--config", args.config, "--dense", *args.flags, "-o", out / "dense")
        train(out / "dense", out / "dense-run", args.base_steps, args.base_steps, args)
        weights = ["--weights", out / "dense-run" / "final.safetensors"]
    rows, seconds = {}, {}
    for i, label in enumerate(args.variants):
        build = out / f"moe-{i}"
        compile_flags, train_flags = VARIANTS[label]
        sh(*MOEC, "compile", args.model, "--config", args.config, "--experts", args.experts, "--topk", args.topk,
           *compile_flags, *weights, *args.flags, "-o", build)
        start = time.perf_counter()
        records = [r for r in train(build, out / f"run-{i}", args.steps, 1, args, train_flags) if r["kind"] == "train"]
        seconds[label] = (time.perf_counter() - start) / args.steps  # start-up and the start-of-run fit included
        rows[label] = {r["step"]: max(layer["max"] / layer["mean"] for layer in r["expert_load"]) for r in records}
        if not args.keep:  # a full-depth model's weights are tens of GB a variant: the next needs the disk
            shutil.rmtree(build)
            (out / f"run-{i}" / "final.safetensors").unlink(missing_ok=True)
    steps = [s for s in SHOWN if s <= args.steps]
    shape = args.experts_label or f"{args.experts} experts top-{args.topk}"
    print(f"worst layer's expert load max/mean, {Path(args.model).name} {args.config}, {shape}, upcycled after "
          f"{args.base_steps} dense steps, batch {args.batch_size} x {args.seq_len} x {args.grad_accum} micro-batches, "
          f"lr {args.lr} ({args.device})")
    print(f"| variant | " + " | ".join(f"step {s}" for s in steps) + f" | worst step | mean | steps over {args.target} | s/step |")
    print("| --- |" + " --- |" * (len(steps) + 4))
    for label, by_step in rows.items():
        worst = list(by_step.values())
        print(f"| {label} | " + " | ".join(f"{by_step[s]:.2f}" for s in steps) + f" | {max(worst):.2f} | "
              f"{sum(worst) / len(worst):.2f} | {sum(w > args.target for w in worst)} of {len(worst)} | "
              f"{seconds[label]:.2f} |")


if __name__ == "__main__":
    main()
