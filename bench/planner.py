"""The cost model against the emitted training program on one GPU: predicted
and measured peak memory and step time for upcycled Llama configurations that
vary the experts E, top-k K, hidden size D, micro-batch and expert recompute.

    python bench/planner.py --out build/planner

Steps: `moec calibrate` measures this GPU (GEMM rate and m_half, copy
bandwidth) into a profile; each configuration is compiled with `moec
compile` and trained with `python BUILD/train.py` (bf16 autocast, fused
AdamW), which reports torch.cuda.max_memory_allocated and tokens/s; the
planner's formulas, fed that profile and the shape captured from the same
model file, give the predictions. Step time is the mean over the steady
windows (the first --log-every steps left out). The profile's one
training-program constant, kappa (memory-bound passes over the saved
activations), is fitted to the first configuration's measured step time;
that configuration is left out of the comparison. `--predict-only
RESULTS` recomputes the predictions for a saved run (no GPU).
"""
import argparse
import functools
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MOEC = (sys.executable, "-m", "moec.driver.cli")
MODEL = ROOT / "examples" / "llama.py"
# GPU-bound sizes: with less work per step the host's kernel launches set the pace
BASE = dict(vocab_size=32000, dim=2048, n_layers=2, n_heads=16, n_kv_heads=8, ffn_dim=5632, max_seq_len=2048)


@dataclass(frozen=True)
class Config:
    name: str
    experts: int
    topk: int
    batch: int
    dim: int = 2048
    ffn_dim: int = 5632
    layers: int = 2
    recompute: bool = False

    def sets(self) -> list[str]:
        base = dict(BASE, dim=self.dim, ffn_dim=self.ffn_dim, n_layers=self.layers)
        return [x for k, v in base.items() for x in ("--set", f"{k}={v}")]


CALIBRATION = Config("E8 K2 B8", 8, 2, 8)
CONFIGS = (
    Config("E16 K2 B8", 16, 2, 8),
    Config("E8 K4 B8", 8, 4, 8),
    Config("E8 K2 B4", 8, 2, 4),
    Config("E8 K2 B8 recompute", 8, 2, 8, recompute=True),
    Config("E16 K4 B8 recompute", 16, 4, 8, recompute=True),
    Config("D1024 L4 E8 K2 B16", 8, 2, 16, dim=1024, ffn_dim=2816, layers=4),
)


def sh(*cmd, capture=False):
    print("$", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, text=True, capture_output=capture)


def measure(cfg: Config, out: Path, args) -> dict:
    build = out / cfg.name.replace(" ", "_")
    sh(*MOEC, "compile", MODEL, *cfg.sets(), "--experts", cfg.experts, "--topk", cfg.topk, "--no-verify",
       "--force", "--max-weights-gb", 64, *(["--recompute-experts"] if cfg.recompute else []), "-o", build)
    run = build / "runs" / "bench"
    sh(sys.executable, build / "train.py", "--steps", args.steps, "--batch-size", cfg.batch, "--seq-len",
       BASE["max_seq_len"], "--log-every", args.log_every, "--eval-every", 0, "--ckpt-every", -1, "--warmup", 5,
       "--run-dir", run)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(build)  # its weights and final export: gigabytes
    steady = [r for r in records if r["kind"] == "train"][1:]
    tokens = cfg.batch * BASE["max_seq_len"]
    return {"step_s": sum(tokens / r["tokens_per_s"] for r in steady) / len(steady),
            "peak_bytes": max(r["peak_memory_gib"] for r in steady) * 2**30}


@functools.cache
def _shape(dim: int, ffn_dim: int, layers: int):
    """The captured model's shape (a capture per size, not per prediction)."""
    from moec.driver.model_shape import shape_from_model

    return shape_from_model(str(MODEL), None, BASE["max_seq_len"],
                            overrides=dict(BASE, dim=dim, ffn_dim=ffn_dim, n_layers=layers))


def predict(cfg: Config, profile: dict, kappa: float | None = None) -> dict:
    from moec.base.options import Options
    from moec.cost_model import Hardware, single_gpu_prediction

    if kappa is not None:
        profile = dict(profile, gpu=dict(profile["gpu"], elementwise_passes=kappa))
    plan = single_gpu_prediction(_shape(cfg.dim, cfg.ffn_dim, cfg.layers), Options(experts=cfg.experts, topk=cfg.topk), Hardware.from_dict(profile),
                                 cfg.batch, cfg.recompute)
    return {"step_s": plan.step_time_s, "peak_bytes": plan.peak_memory_bytes, "memory": plan.memory_bytes,
            "time": plan.time_s}


def fit_kappa(profile: dict, measured_step_s: float) -> float:
    """kappa at which the calibration configuration's predicted step time is the measured one
    (the step time is linear in kappa)."""
    t0, t1 = (predict(CALIBRATION, profile, k)["step_s"] for k in (0.0, 1.0))
    return max((measured_step_s - t0) / (t1 - t0), 0.0)


def predict_all(saved: dict) -> float:
    """Fill in every result's predictions; the fitted kappa."""
    kappa = fit_kappa(saved["profile"], saved["calibration"]["step_s"])
    by_name = {c.name: c for c in CONFIGS}
    for r in saved["results"]:
        r["predicted"] = predict(by_name[r["name"]], saved["profile"], kappa)
    return kappa


def table(results: list[dict], device: str, kappa: float) -> str:
    lines = [f"Device: {device}. Predicted (cost model with the calibrated profile, kappa {kappa:.1f}) vs "
             f"measured (train.py).", "",
             "| config | memory predicted GiB | measured GiB | error | step predicted ms | measured ms | error |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        p, m = r["predicted"], r["measured"]
        em, et = p["peak_bytes"] / m["peak_bytes"] - 1, p["step_s"] / m["step_s"] - 1
        lines.append(f"| {r['name']} | {p['peak_bytes'] / 2**30:.2f} | {m['peak_bytes'] / 2**30:.2f} | {em:+.1%} | "
                     f"{p['step_s'] * 1e3:.1f} | {m['step_s'] * 1e3:.1f} | {et:+.1%} |")
    # the question a planner answers: which configuration trains fastest per token
    per_token = lambda r, k: r[k]["step_s"] / r["tokens"]  # noqa: E731
    best_p = min(results, key=lambda r: per_token(r, "predicted"))["name"]
    best_m = min(results, key=lambda r: per_token(r, "measured"))["name"]
    lines += ["", f"Fastest per token: predicted {best_p}, measured {best_m} "
                  f"({'the same' if best_p == best_m else 'different'})."]
    worst_m = max(abs(r["predicted"]["peak_bytes"] / r["measured"]["peak_bytes"] - 1) for r in results)
    worst_t = max(abs(r["predicted"]["step_s"] / r["measured"]["step_s"] - 1) for r in results)
    lines.append(f"Largest errors: memory {worst_m:.1%} (target 10 %), step time {worst_t:.1%} (target 20 %).")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "build" / "planner"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--predict-only", default=None, help="results.json of an earlier run: recompute predictions")
    args = p.parse_args()
    if args.predict_only:
        saved = json.loads(Path(args.predict_only).read_text())
        print(table(saved["results"], saved["device"], predict_all(saved)))
        return
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sh(*MOEC, "calibrate", "--base", "dgx_h100", "-o", out / "profile.json")
    saved = {"device": torch.cuda.get_device_name(), "profile": json.loads((out / "profile.json").read_text()),
             "calibration": measure(CALIBRATION, out, args),
             "results": [{"name": c.name, "tokens": c.batch * BASE["max_seq_len"], "measured": measure(c, out, args)}
                         for c in CONFIGS]}
    kappa = predict_all(saved)
    (out / "results.json").write_text(json.dumps(saved, indent=1))
    print(table(saved["results"], saved["device"], kappa))


if __name__ == "__main__":
    main()
