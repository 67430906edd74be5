"""Sparse upcycling vs dense: from one trained dense checkpoint, does the upcycled MoE end below the dense
model it came from, beyond the spread of seeds, at equal tokens and at equal FLOPs?

1. compile --model dense and train it --base-steps (its validation loss should still fall, but slowly);
2. from its final weights, per seed: the dense model continued for --steps ("dense"); the dense model
   continued for as many FLOPs as the MoE spends ("dense, equal FLOPs": steps times the MoE's FLOPs per
   token over the dense's); and each MoE variant (`moec compile --weights ... --experts 8 --topk 2`, and
   a fine-grained one) for --steps. Every run of a seed reads the same batches; validation batches are
   the same for every run;
3. print the validation loss at each evaluation, mean and spread (max - min) over the seeds, and the
   final gaps against three times the larger of the two spreads.

    python bench/upcycle_quality.py --out build/upcycle-bench                    # CPU, the embedded text
    python bench/python_corpus.py -o build/corpus.txt                         # a larger corpus, then on a GPU:
    python bench/upcycle_quality.py --model examples/llama.py --set dim=1024 n_layers=12 n_heads=16 \\
        n_kv_heads=4 ffn_dim=2816 max_seq_len=1024 --data build/corpus.txt --device cuda --seq-len 1024 \\
        --batch-size 32 --base-steps 1000 --steps 300 --eval-every 50 --seeds 0 1 2
"""
import argparse
import concurrent.futures
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MOEC = (sys.executable, "-m", "moec.driver.cli")  # the moec of this interpreter
MOE_VARIANTS = {
    "MoE 8e top-2": ["--experts", "8", "--topk", "2"],
    "MoE 8e top-2 x4 fine-grained (32e top-8)": ["--experts", "8", "--topk", "2", "--granularity", "4"],
}


def sh(*cmd):
    print("$", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL)


def compile_build(args, out: Path, *flags):
    sets = [x for kv in args.set for x in ("--set", kv)]
    sh(*MOEC, "compile", args.model, "--config", args.config, *sets, *flags, "-o", out, "--force")
    return json.loads((out / "config.json").read_text())


def train(build: Path, run: Path, args, steps: int, seed: int) -> list[dict]:
    data = ["--data", args.data] if args.data else []
    sh(sys.executable, build / "train.py", "--steps", steps, "--batch-size", args.batch_size, "--seq-len",
       args.seq_len, "--lr", args.lr, "--warmup", args.warmup, "--eval-every", args.eval_every,
       "--eval-batches", args.eval_batches, "--log-every", args.eval_every, "--ckpt-every", -1, "--seed", seed,
       "--device", args.device, "--run-dir", run, "--overwrite", *data)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def flops_per_token(config: dict) -> float:
    """6 x active parameters: attention's score FLOPs, the same in every arm, are left out, which makes the
    equal-FLOPs dense run slightly longer than exact (in the dense model's favour)."""
    return 6 * config["result"]["active_params"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "build" / "upcycle-bench"))
    p.add_argument("--model", default=str(ROOT / "examples" / "gpt.py"))
    p.add_argument("--config", default="small")
    p.add_argument("--set", nargs="*", default=[], help="factory overrides, key=value")
    p.add_argument("--data", default=None, help="train.py --data (default: the embedded text)")
    p.add_argument("--device", default="auto")
    p.add_argument("--base-steps", type=int, default=60)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="*", default=list(MOE_VARIANTS), choices=list(MOE_VARIANTS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--parallel", type=int, default=1,
                   help="compiles and runs at a time (a large GPU fits several; wall times then overlap)")
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="compile flags of the MoE builds (last)")
    args = p.parse_args()
    out = Path(args.out)
    t0 = time.time()

    base_build = out / "dense-base"
    weights = out / "runs" / "base" / "final.safetensors"
    if not weights.exists():  # a rerun into the same --out reuses the trained dense model
        compile_build(args, base_build, "--dense")
        train(base_build, out / "runs" / "base", args, args.base_steps, 0)
    base_val = [r for r in (json.loads(x) for x in (out / "runs" / "base" / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "val"]
    configs = {"dense": compile_build(args, out / "dense", "--dense", "--weights", weights)}

    def moe_build(label, seed):  # the seed also draws the router rows
        return out / f"moe-{list(MOE_VARIANTS).index(label)}-s{seed}"

    pool = concurrent.futures.ThreadPoolExecutor(args.parallel)
    moe_jobs = [(label, pool.submit(compile_build, args, moe_build(label, seed), *MOE_VARIANTS[label], "--weights",
                                    weights, "--seed", seed, *args.flags))
                for label in args.variants for seed in args.seeds]
    for label, job in moe_jobs:
        configs[label] = job.result()
    ratio = max(flops_per_token(configs[v]) for v in args.variants) / flops_per_token(configs["dense"])
    flops_steps = round(args.steps * ratio)

    curves = {}  # label -> seed -> [(tokens, val_loss)]
    arms = [("dense", lambda seed: out / "dense", args.steps),
            ("dense, equal FLOPs", lambda seed: out / "dense", flops_steps)]
    arms += [(v, lambda seed, v=v: moe_build(v, seed), args.steps) for v in args.variants]
    tokens_per_step = args.batch_size * args.seq_len
    walls = {}

    def run_arm(label, build, steps, seed):
        t = time.time()
        records = train(build, out / "runs" / f"{build.name}-{steps}-s{seed}", args, steps, seed)
        walls[label] = walls.get(label, 0.0) + time.time() - t
        val = [(r["step"] * tokens_per_step, r["val_loss"]) for r in records if r["kind"] == "val"]
        print(f"{label}, seed {seed}: validation loss {val[-1][1]:.4f} after {steps} steps", flush=True)
        return val

    jobs = [(label, seed, pool.submit(run_arm, label, build_of(seed), steps, seed))
            for label, build_of, steps in arms for seed in args.seeds]
    for label, seed, job in jobs:
        curves.setdefault(label, {})[seed] = job.result()

    cfg = configs["dense"]["result"]
    print(f"\n{Path(args.model).name} {args.config} {' '.join(args.set)}; batch {args.batch_size} x {args.seq_len} "
          f"tokens, lr {args.lr}, warmup {args.warmup}, cosine; {args.device}; {time.time() - t0:.0f} s in all")
    print(f"dense base: {args.base_steps} steps ({args.base_steps * tokens_per_step / 1e6:.1f} M tokens), "
          f"validation loss " + ", ".join(f"{r['val_loss']:.4f} @ step {r['step']}" for r in base_val[-4:]))
    print(f"dense: {cfg['params'] / 1e6:.1f} M params, {flops_per_token(configs['dense']) / 1e9:.2f} GFLOP/token")
    for v in args.variants:
        r = configs[v]["result"]
        print(f"{v}: {r['params'] / 1e6:.1f} M params, {r['active_params'] / 1e6:.1f} M active, "
              f"{flops_per_token(configs[v]) / 1e9:.2f} GFLOP/token")
    print(f"dense, equal FLOPs: {flops_steps} steps; wall time per run ({args.parallel} at a time): "
          + ", ".join(f"{k} {w / len(args.seeds):.0f} s" for k, w in walls.items()))
    print(f"\nvalidation loss after upcycling, mean over seeds {args.seeds} (spread max - min)\n")
    labels = list(curves)
    print("| M tokens | " + " | ".join(labels) + " |")
    print("|---:|" + "---:|" * len(labels))
    rows = sorted({tok for c in curves.values() for s in c.values() for tok, _ in s})
    for tok in rows:
        cells = []
        for label in labels:
            vals = [dict(c)[tok] for c in curves[label].values() if tok in dict(c)]
            cells.append(f"{statistics.mean(vals):.4f} ({max(vals) - min(vals):.4f})" if len(vals) == len(args.seeds)
                         else "")
        print(f"| {tok / 1e6:.2f} | " + " | ".join(cells) + " |")

    def final(label):
        return [c[-1][1] for c in curves[label].values()]

    print()
    for v in args.variants:
        for ref in ("dense", "dense, equal FLOPs"):
            gap = statistics.mean(final(v)) - statistics.mean(final(ref))
            spread = max(max(final(v)) - min(final(v)), max(final(ref)) - min(final(ref)))
            verdict = ("the MoE ahead beyond the noise" if -gap > 3 * spread else
                       "the dense model ahead beyond the noise" if gap > 3 * spread else "within the noise")
            print(f"{v} - {ref} at the end: {gap:+.4f}; 3 x spread {3 * spread:.4f}: {verdict}")


if __name__ == "__main__":
    main()
