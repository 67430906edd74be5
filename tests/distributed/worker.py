"""What each process of the distributed tests runs (under torchrun), and the
single-process reference the tests compare with.

    python -m torch.distributed.run --nproc_per_node P worker.py OUT.json JOB.json

JOB: {"runs": [{"build", "steps", "name", optional "start", "save", "resume", "zero"}], "ops": bool,
"device": "cpu" (gloo) or "cuda" (NCCL, bf16 autocast)}; rank 0
writes {name: [global loss per step]} and the op-level checks' results to OUT.
"""
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import moec.runtime.distributed as md
from moec.base.options import Options
from moec.runtime.distributed import checkpoint, groups
from moec.runtime.distributed.trace import CollectiveTrace, agreement
from moec.runtime.distributed.zero import make_optimizer
from moec.runtime import load_build, local_experts

BATCH, SEQ = 8, 12  # the global batch: every world size splits these rows


def load_model(build: str, device: str = "cpu"):
    spec = importlib.util.spec_from_file_location(f"build_{Path(build).name}", Path(build) / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    options = Options.from_json(json.loads((Path(build) / "config.json").read_text())["options"])
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    return load_build(mod.Model, build, device, *local_experts(options, world, rank)), options


def batch(step: int, vocab: int, rank: int, world: int):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    rows = tokens[rank * BATCH // world:(rank + 1) * BATCH // world]
    return rows[:, :-1], rows[:, 1:]


def train(build: str, steps: int, start: int = 0, save: str | None = None, resume: str | None = None,
          device: str = "cpu", zero: bool = False) -> list[float]:
    """Per-step loss of the global batch (mean over ranks of each rank's loss) for steps start..steps-1;
    resume: a DCP checkpoint to start from; save: where to write one after the last step."""
    model, options = load_model(build, device)
    model, mesh, grad_sync = md.setup(model, options)
    opt = (make_optimizer(model, torch.optim.AdamW, lr=3e-3, weight_decay=0.01) if zero
           else torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01))
    if resume:
        checkpoint.load(resume, model, opt, mesh)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    vocab = model.tok_embeddings.weight.shape[0]
    losses = []
    for step in range(start, steps):
        x, y = (t.to(device) for t in batch(step, vocab, rank, world))
        with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            out = model(x)
        loss = F.cross_entropy(out["logits"].float().flatten(0, 1), y.flatten()) + out["aux_loss"] + out["z_loss"]
        opt.zero_grad()
        loss.backward()
        grad_sync()
        opt.step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    if save:
        checkpoint.save(save, model, opt, mesh)
    return losses


def main(out: str, job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    device = job.get("device", "cpu")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    result = {}
    for run in job["runs"]:
        with CollectiveTrace() as trace:
            result[run["name"]] = train(run["build"], run["steps"], run.get("start", 0), run.get("save"),
                                        run.get("resume"), device, run.get("zero", False))
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, trace.record())
        result[run["name"] + ":collectives_agree"] = agreement(dict(enumerate(every))) == []
        result[run["name"] + ":collectives"] = len(every[0]["collectives"])
    if job.get("ops"):
        from tests.distributed import op_checks
        result.update(op_checks.run_all())
    groups.clear()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
