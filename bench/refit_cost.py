"""What the per-step refit of the expert selection biases costs next to a training step: one micro-batch's
forward, backward and AdamW step; the fit itself (--bias-refit iterations of top-k over [T, E] a layer);
scoring the kept router inputs with the updated routers ([T, D] x [D, E] a layer); and the extra forward of
--bias-refit-forward. Each the median of --repeats, on the compiled build of examples/gpt.py (its random
initialisation upcycled: the cost does not depend on the weights).

    OMP_NUM_THREADS=1 python bench/refit_cost.py --flags --no-triton
    OMP_NUM_THREADS=1 python bench/refit_cost.py --experts 8 --topk 1 --label "64 experts top-8" \\
        --flags --granularity 8 --no-triton

--drift N instead trains N steps (AdamW, lr warming up to --lr over N, as train.py does with --warmup N) and
prints, per step and layer, how far the optimizer step moves the last micro-batch's router logits (norm of
the change over the norm of the logits): by the router's own update (the kept inputs scored with the new
router weights, what the refit fits) and by the move of its inputs (those of a forward after the step, what
--bias-refit-forward adds). Pass --flags --weights DENSE.safetensors to upcycle a trained model.
"""
import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moec.runtime import BuildInfo, TokenData, load_build, load_tokens
from moec.runtime.training.balance import ExpertBias

ROOT = Path(__file__).resolve().parent.parent


def median_seconds(fn, repeats, device):
    fn()  # the first call warms up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def backward(model, inputs, targets, autocast) -> dict:
    """The training loss's backward (LM, aux and z losses, as train.py adds them); the forward's outputs."""
    with autocast():
        out = model(inputs)
    loss = F.cross_entropy(out["logits"].float().flatten(0, 1), targets.flatten())
    (loss + out["aux_loss"] + out["z_loss"]).backward()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "examples" / "gpt.py"))
    p.add_argument("--config", default="tiny")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--label", default=None, help="how the table names the layer shape")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=12, help="the refit's iterations (train.py --bias-refit)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--drift", type=int, default=0, metavar="STEPS", help="measure the logits' move instead")
    p.add_argument("--lr", type=float, default=1e-3, help="--drift's peak learning rate")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 autocast, as train.py)")
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="compile flags (last)")
    args = p.parse_args()
    build = Path(tempfile.mkdtemp()) / "moe"
    subprocess.run([sys.executable, "-m", "moec.driver.cli", "compile", args.model, "--config", args.config,
                    "--experts", str(args.experts), "--topk", str(args.topk), *args.flags, "-o", str(build)],
                   check=True, stdout=subprocess.DEVNULL)
    spec = importlib.util.spec_from_file_location("refit_cost_model", build / "model.py")
    sys.path.insert(0, str(build))
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    info = BuildInfo.read(build, module.Model, args.batch_size, args.seq_len)
    device = torch.device(args.device)
    model = load_build(module.Model, build, device)
    autocast = lambda: torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    balance = ExpertBias(model, info.router_biases, info.options.expert_bias_rate,
                         info.options.topk * info.options.granularity, info.options.router, args.iters)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = TokenData(load_tokens(None), args.seq_len, 0.05, 0).batch("train", 0, args.batch_size, 0, 1)
    inputs, targets = (t.to(device) for t in batch)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = backward(model, inputs, targets, autocast)
        optimizer.step()
        balance.add(out)

    def forward():
        with torch.no_grad(), autocast():
            model.eval()
            model(inputs)
            model.train()

    if args.drift:
        return drift(model, balance, device, autocast, args)
    step()
    logits = balance.router_logits()
    parts = {"step": median_seconds(step, args.repeats, device),
             "fit": median_seconds(lambda: balance.refit(logits, args.iters), args.repeats, device),
             "score": median_seconds(balance.router_logits, args.repeats, device),
             "forward": median_seconds(forward, args.repeats, device)}
    s = parts["step"]
    cells = {"step": s, "fit to the logits before the step": parts["fit"],
             "score + fit (after the step)": parts["score"] + parts["fit"],
             "forward + score + fit": parts["forward"] + parts["score"] + parts["fit"]}
    print("| layers | " + " | ".join(cells) + " |")
    print("| --- |" + " --- |" * len(cells))
    label = args.label or f"{args.experts} experts top-{args.topk}"
    print(f"| {label} | {s:.3f} s | " + " | ".join(f"{v:.3f} s (+{100 * v / s:.0f}%)" for k, v in cells.items()
                                                   if k != "step") + " |")
    print(f"(score alone: {parts['score'] * 1e3:.2f} ms; forward alone: {parts['forward']:.3f} s)")


def drift(model, balance, device, autocast, args):
    data = TokenData(load_tokens(None), args.seq_len, 0.05, 0)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    relative = lambda a, b: " ".join(f"{((y - x).norm() / x.norm()).item():.3f}" for x, y in zip(a, b))
    print("| step | lr | router update, by layer | inputs' move, by layer |")
    print("| --- | --- | --- | --- |")
    for step in range(args.drift):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * (step + 1) / args.drift
        inputs, targets = (t.to(device) for t in data.batch("train", step, args.batch_size, 0, 1))
        optimizer.zero_grad(set_to_none=True)
        out = backward(model, inputs, targets, autocast)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        balance.add(out)
        before = balance.router_logits()
        optimizer.step()
        routers = balance.router_logits()
        kept = balance.inputs
        with autocast():  # --bias-refit-forward's forward
            balance.rescore(model, lambda x, y: (None, model(x)), inputs, targets)
        both, balance.inputs = balance.router_logits(), kept
        print(f"| {step + 1} | {optimizer.param_groups[0]['lr']:.1e} | {relative(before, routers)} | "
              f"{relative(routers, both)} |")
        balance.step()


if __name__ == "__main__":
    main()
