"""Sparse upcycling vs dense, on the embedded text: does an upcycled MoE learn
faster than the dense model it came from, at equal steps?

1. compile examples/gpt.py (--config small) dense and train it --base-steps;
2. from its final weights, (a) the dense model and (b) its upcycled MoE
   (`moec compile --weights ... --experts 8 --topk 2`) each train --steps more,
   with the same data, batches, optimizer and schedule;
3. print their validation losses side by side.

    python bench/upcycle_quality.py --out build/upcycle-bench
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MOEC = (sys.executable, "-m", "moec.driver.cli")  # the moec of this interpreter


def sh(*cmd):
    print("$", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL)


def train(build: Path, run: Path, args, steps: int) -> list[dict]:
    sh(sys.executable, build / "train.py", "--steps", steps, "--batch-size", args.batch_size, "--seq-len",
       args.seq_len, "--lr", args.lr, "--warmup", args.warmup, "--eval-every", args.eval_every,
       "--eval-batches", args.eval_batches, "--log-every", args.eval_every, "--ckpt-every", 0, "--run-dir", run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "val"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "build" / "upcycle-bench"))
    p.add_argument("--base-steps", type=int, default=60)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--eval-batches", type=int, default=4)
    args = p.parse_args()
    out = Path(args.out)
    model = ROOT / "examples" / "gpt.py"
    t0 = time.time()

    sh(*MOEC, "compile", model, "--config", "small", "--dense", "-o", out / "dense", "--force")
    base = train(out / "dense", out / "runs" / "base", args, args.base_steps)
    weights = out / "runs" / "base" / "final.safetensors"
    sh(*MOEC, "compile", model, "--config", "small", "--dense", "--weights", weights, "-o", out / "dense-cont",
       "--force")
    sh(*MOEC, "compile", model, "--config", "small", "--experts", 8, "--topk", 2, "--weights", weights,
       "-o", out / "moe", "--force")
    dense = train(out / "dense-cont", out / "runs" / "dense", args, args.steps)
    moe = train(out / "moe", out / "runs" / "moe", args, args.steps)

    params = {name: json.loads((out / name / "config.json").read_text())["result"] for name in ("dense-cont", "moe")}
    print(f"\nexamples/gpt.py --config small on the embedded text; batch {args.batch_size} x {args.seq_len} tokens, "
          f"lr {args.lr}, warmup {args.warmup}, cosine; {time.time() - t0:.0f} s in all")
    print(f"dense base: {args.base_steps} steps, validation loss {base[-1]['val_loss']:.4f}")
    print(f"dense: {params['dense-cont']['params'] / 1e6:.1f} M params; MoE 8 experts top-2: "
          f"{params['moe']['params'] / 1e6:.1f} M params, {params['moe']['active_params'] / 1e6:.1f} M active\n")
    print(f"| steps after upcycling | dense val loss | MoE (8e, top-2) val loss | MoE - dense |")
    print(f"|---:|---:|---:|---:|")
    for d, m in zip(dense, moe):
        print(f"| {d['step']} | {d['val_loss']:.4f} | {m['val_loss']:.4f} | {m['val_loss'] - d['val_loss']:+.4f} |")


if __name__ == "__main__":
    main()
