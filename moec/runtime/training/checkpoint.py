"""Training checkpoints: model and optimizer through torch.distributed.checkpoint
(each rank writes its own shards), plus a small per-rank file with the step, LR
schedule and RNG states. Two layouts, named in that file:
  "state_dict"  torch's get_state_dict: one process, DDP and FSDP2
  "by_name"     moec.runtime.distributed.checkpoint, each parameter's state under its
                name: expert-parallel runs (every expert once, at its global
                shape) and ZeRO-1 runs (each rank writes the state of the
                parameters it updates). Any world size, EP or --zero resumes it.

A checkpoint is written into a temporary directory, its files fsynced, a
manifest (size and sha256 of every file) written last, and only then renamed
to step_NNNNNNNN. So a directory without a manifest, or whose files disagree
with it, is a half-written or damaged checkpoint: loading skips it and falls
back to the newest good one. The last `keep` checkpoints are kept.
"""
import hashlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from moec.base.errors import MoecError
from moec.runtime.distributed import checkpoint as by_name
from moec.runtime.distributed.zero import ShardedOptimizer
from moec.runtime.training.loop import unwrap

MANIFEST = "manifest.json"
# DCP warns on every single-process save/load that it assumes a single process; it is right.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def verify(path: Path) -> str | None:
    """None if the checkpoint at path is complete and intact, else what is wrong with it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"no readable {MANIFEST} ({type(e).__name__})"
    for name, (size, digest) in manifest["files"].items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{name} is missing or has the wrong size"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum"
    return None


class Checkpointer:
    def __init__(self, root: Path, keep: int = 3, rank: int = 0, mesh=None, by_name: bool = False):
        """mesh: the (dp, ep) DeviceMesh of an expert-parallel run, whose experts are
        saved with their global shapes, so a run resumes at another EP size.
        by_name: write the "by_name" layout without a mesh too (an expert-parallel
        build on one process), so torchrun can resume it at its EP size."""
        self.root, self.keep, self.rank, self.mesh = Path(root), keep, rank, mesh
        self.by_name = by_name or mesh is not None

    def _complete(self) -> list[Path]:
        return sorted(self.root.glob("step_*"), reverse=True) if self.root.is_dir() else []

    def save(self, step: int, model, optimizer, extra: dict) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        if self.by_name or isinstance(optimizer, ShardedOptimizer):
            layout = "by_name"
            by_name.save(tmp, unwrap(model), optimizer, self.mesh)
        else:
            layout = "state_dict"
            msd, osd = get_state_dict(model, optimizer)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        # by_name keeps no optimizer settings: the LR a scheduler set for the next step goes here
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        torch.save({**extra, "step": step, "layout": layout, "param_groups": groups},
                   tmp / f"extra_rank{self.rank}.pt")
        _barrier()
        if self.rank == 0:
            files = sorted(p for p in tmp.iterdir() if p.is_file())
            for f in files:
                _fsync(f)
            manifest = {"step": step, "files": {f.name: [f.stat().st_size, _sha256(f)] for f in files}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _fsync(tmp / MANIFEST)
            _fsync(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync(self.root)
            for old in self._complete()[self.keep:]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def _latest_good(self, log) -> Path | None:
        for path in self._complete():
            problem = verify(path)
            if problem is None:
                return path
            log(f"checkpoint {path.name} is damaged or incomplete ({problem}); trying an older one")
        return None

    def load_latest(self, model, optimizer, log=lambda m: print(m, file=sys.stderr)) -> dict | None:
        """Restore the newest intact checkpoint into model and optimizer; its extra dict, or None if none."""
        choice = [self._latest_good(log) if self.rank == 0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        path = choice[0]
        if path is None:
            return None
        extra = path / f"extra_rank{self.rank}.pt"
        extra = torch.load(extra if extra.exists() else path / "extra_rank0.pt", weights_only=True)
        if extra["layout"] == "by_name":
            by_name.load(path, unwrap(model), optimizer, self.mesh)  # experts resharded to this run's EP
            for group, saved in zip(optimizer.param_groups, extra["param_groups"], strict=True):
                group.update(saved)
        elif self.mesh is not None:
            raise MoecError(f"checkpoint {path} was written by one process in the whole-state layout, which an "
                            f"expert-parallel run cannot reshard: resume it on one process")
        elif isinstance(optimizer, ShardedOptimizer):
            raise MoecError(f"checkpoint {path} holds a whole optimizer state (written without --zero): "
                            f"resume it without --zero")
        else:
            msd, osd = get_state_dict(model, optimizer)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return extra

    def latest(self) -> Path | None:
        done = self._complete()
        return done[0] if done else None
