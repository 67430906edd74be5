"""Training checkpoints: model and optimizer through torch.distributed.checkpoint
(each rank writes its own shards), plus a small per-rank file with the step, the optimizer
settings and RNG states. Two layouts, named in that file:
  "state_dict"  torch's get_state_dict: one process, DDP and FSDP2
  "by_name"     moec.runtime.distributed.checkpoint, each parameter's state under its
                name: expert-parallel runs (every expert once, at its global
                shape) and ZeRO-1 runs (each rank writes the state of the
                parameters it updates). Any world size, EP or --zero resumes it.

A checkpoint is written into a temporary directory, its files fsynced, a
manifest (size and sha256 of every file, and the model's fingerprint) written
last, and only then renamed to step_NNNNNNNN. A save that fails removes the
temporary directory; one that ran out of space says so.

Loading takes the newest checkpoint (at most a given step) that is intact (its
files agree with its manifest), of this model (its fingerprint is this one's,
or it has none recorded) and fits (its metadata, read without running any code
it holds, has every model tensor at this model's shape). Every other one is
skipped with a line saying why, before anything is loaded into the model.

The newest `keep` intact checkpoints of this model are kept; older ones are
deleted, other models' and damaged ones left alone. For that, and for latest()
and intact_steps(), intact means a well-formed manifest whose files have their
sizes: checksums are read when loading, not after every save.
"""
import errno
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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from moec.base.errors import MoecError
from moec.runtime.distributed import checkpoint as by_name
from moec.runtime.distributed.tensor_parallel import tp_layout
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


def _read_manifest(path: Path, checksums: bool = True) -> tuple[dict | None, str | None]:
    """(manifest, None) if the checkpoint at path is complete (and, with checksums, intact),
    else (None, what is wrong with it)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return None, f"no readable {MANIFEST} ({type(e).__name__})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or not all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], int) and isinstance(e[1], str)
            for e in files.values()):
        return None, f"{MANIFEST} does not list the files with their sizes and checksums"
    for name, (size, digest) in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return None, f"{name} is missing or has the wrong size"
        if checksums and _sha256(f) != digest:
            return None, f"{name} does not match its checksum"
    return manifest, None


def verify(path: Path) -> str | None:
    """None if the checkpoint at path is complete and intact, else what is wrong with it."""
    return _read_manifest(path)[1]


def read_weights(path: Path) -> dict:
    """The model's tensors in the checkpoint at path, by the build's names, once its files match their
    checksums: what `moec export` reads from a run of any EP size or plan."""
    problem = verify(Path(path))
    if problem:
        raise MoecError(f"checkpoint {path} is damaged or incomplete ({problem}); export another step")
    return by_name.read_model(path)


def _reason(e: BaseException) -> str:
    if isinstance(e, CheckpointException):  # DCP's wrapper of each rank's exception
        e = next(iter(e.failures.values()))[0]
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _out_of_space(e: BaseException, tmp: Path, need: int) -> bool:
    """e has ENOSPC in its chain, or the filesystem lacks room for what this rank writes (torch's zip
    writer reports a full disk as RuntimeError 'unexpected pos', no errno)."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return True
        todo += [x.__cause__, x.__context__]
        if isinstance(x, CheckpointException):
            todo += [f[0] for f in x.failures.values()]
    try:  # the partial files count as room: they are removed
        partial = sum(f.stat().st_size for f in tmp.iterdir()) if tmp.is_dir() else 0
        return shutil.disk_usage(tmp.parent).free + partial < need
    except OSError:
        return False


def _local_bytes(model, optimizer) -> int:
    """About what this rank's shards of a checkpoint take: its model and optimizer tensors."""
    tensors = [*unwrap(model).state_dict().values(), *(v for s in optimizer.state.values() for v in s.values())]
    tensors = [t.to_local() if isinstance(t, DTensor) else t for t in tensors if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


class Checkpointer:
    def __init__(self, root: Path, keep: int = 3, rank: int = 0, mesh=None, by_name: bool = False,
                 fingerprint: str | None = None, tp_plan: dict | None = None):
        """mesh: the (dp, ep) DeviceMesh of an expert-parallel run, whose experts are
        saved with their global shapes, so a run resumes at another EP size.
        by_name: write the "by_name" layout without a mesh too (an expert-parallel
        build on one process), so torchrun can resume it at its EP size.
        fingerprint: names the model (train.py's, from the build's parameter table); None: every
        checkpoint counts as this model's.
        tp_plan: config.json's, for a build with tensor parallelism: the weights it splits are saved
        at their global shapes whether this run splits them or not (by_name layout)."""
        if keep < 1:
            raise ValueError(f"Checkpointer keeps the newest `keep` checkpoints: keep={keep} must be at least 1")
        self.root, self.keep, self.rank, self.mesh = Path(root), keep, rank, mesh
        self.by_name = by_name or mesh is not None
        self.fingerprint = fingerprint
        self.split = tp_layout(tp_plan or {})

    def _steps(self, at_most: int | None = None) -> list[tuple[int, Path]]:
        """(step, path) of every step_N directory (of step at_most or earlier), newest first."""
        if not self.root.is_dir():
            return []
        found = [(int(p.name[5:]), p) for p in self.root.glob("step_*") if p.name[5:].isdigit() and p.is_dir()]
        return sorted((s, p) for s, p in found if at_most is None or s <= at_most)[::-1]

    def _ours(self) -> list[tuple[int, Path]]:
        """(step, path) of this model's intact checkpoints (manifest and sizes), newest first."""
        def mine(manifest):
            return manifest is not None and self.fingerprint in (None, manifest.get("fingerprint"))
        return [(s, p) for s, p in self._steps() if mine(_read_manifest(p, checksums=False)[0])]

    def intact_steps(self) -> list[int]:
        """The steps of this model's intact checkpoints, ascending."""
        return sorted(s for s, _ in self._ours())

    def set_aside_after(self, step: int, aside: Path) -> list[str]:
        """Move every checkpoint past step into aside (rank 0); their names."""
        later = [p for s, p in self._steps() if s > step]
        for p in later:
            aside.mkdir(exist_ok=True)
            shutil.rmtree(aside / p.name, ignore_errors=True)
            p.rename(aside / p.name)
        return sorted(p.name for p in later)

    def latest(self) -> Path | None:
        """This model's newest intact checkpoint."""
        ours = self._ours()
        return ours[0][1] if ours else None

    def save(self, step: int, model, optimizer, extra: dict) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        first = self.rank == 0
        phases = [(first, lambda: self._prepare(tmp)),
                  (True, lambda: self._write(tmp, step, model, optimizer, extra)),
                  (first, lambda: self._finish(tmp, final, step))]
        for runs_here, phase in phases:
            error = None
            try:
                if runs_here:
                    phase()
            except (Exception, CheckpointException) as e:  # DCP's is a BaseException
                error = e, _out_of_space(e, tmp, _local_bytes(model, optimizer))
            # every rank learns whether one failed, so none waits on a rank that stopped
            if (error := self._agree(error)) is not None:
                self._failed(final, tmp, *error)
        return final

    def _agree(self, error: tuple | None) -> tuple | None:
        """(exception, out of space) of this rank, else of the first rank that failed, else None."""
        if not dist.is_initialized():
            return error
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error and (_reason(error[0]), error[1]))
        failed = [(rank, *e) for rank, e in enumerate(errors) if e is not None]
        if error is not None or not failed:
            return error
        rank, reason, full = failed[0]
        return MoecError(f"rank {rank} failed writing a checkpoint: {reason}"), full

    def _failed(self, final: Path, tmp: Path, error: BaseException, out_of_space: bool):
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint only fills the disk
        if not out_of_space:
            raise error
        last = self.latest()
        raise MoecError(f"no space left on device writing checkpoint {final.name} in {self.root}; removed the "
                        f"partial checkpoint. " + (f"The newest intact checkpoint is {last.name}" if last else
                                                   "There is no intact checkpoint yet")) from error

    def _prepare(self, tmp: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

    def _write(self, tmp: Path, step: int, model, optimizer, extra: dict) -> None:
        if self.by_name or isinstance(optimizer, ShardedOptimizer):
            layout = "by_name"
            by_name.save(tmp, unwrap(model), optimizer, self.mesh, self.split)
        else:
            layout = "state_dict"
            msd, osd = get_state_dict(model, optimizer)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        # by_name keeps no optimizer settings: the LR a scheduler set for the next step goes here
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        torch.save({**extra, "step": step, "layout": layout, "param_groups": groups},
                   tmp / f"extra_rank{self.rank}.pt")

    def _finish(self, tmp: Path, final: Path, step: int) -> None:
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        for f in files:
            _fsync(f)
        manifest = {"step": step, "fingerprint": self.fingerprint,
                    "files": {f.name: [f.stat().st_size, _sha256(f)] for f in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(self.root)
        for _, old in self._ours()[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)

    def _candidates(self, at_most, log):
        """Rank 0: the intact checkpoints not of another model, newest first; a line for each other one."""
        for _, path in self._steps(at_most):
            manifest, problem = _read_manifest(path, checksums=False)
            theirs = manifest.get("fingerprint") if manifest else None
            if theirs and self.fingerprint and theirs != self.fingerprint:
                log(f"checkpoint {path.name} belongs to another model (fingerprint {theirs}, this one is "
                    f"{self.fingerprint}); skipping it")
                continue
            if problem := problem or verify(path):
                log(f"checkpoint {path.name} is damaged or incomplete ({problem}); trying an older one")
                continue
            yield path

    def _extra(self, path: Path) -> dict:
        extra = path / f"extra_rank{self.rank}.pt"
        return torch.load(extra if extra.exists() else path / "extra_rank0.pt", weights_only=True)

    def _fits(self, path: Path, model, optimizer) -> tuple[dict | None, str | None]:
        """(extra, None) if path's checkpoint can fill model, else (None, why not). Reads its metadata
        and extra file only; raises MoecError for a layout this run cannot read."""
        try:
            extra = self._extra(path)
            layout, metadata = extra["layout"], by_name.read_metadata(path)
        except Exception as e:
            return None, f"is damaged ({_reason(e)})"
        if layout != "by_name" and self.mesh is not None:
            raise MoecError(f"checkpoint {path} holds the whole state of a run without EP, PP or TP (one process, "
                            f"DDP or FSDP), which a run of this plan cannot reshard: resume it on one process with "
                            f"this build first, whose checkpoints resume under any plan")
        if layout != "by_name" and isinstance(optimizer, ShardedOptimizer):
            raise MoecError(f"checkpoint {path} holds a whole optimizer state (written without --zero): "
                            f"resume it without --zero")
        state = (by_name.named_state(unwrap(model), None, self.mesh, self.split) if layout == "by_name" else
                 {f"model.{k}": v for k, v in get_model_state_dict(model).items()})
        try:
            problem = by_name.mismatch(state, metadata)
        except Exception as e:  # metadata of the admitted classes, but not shaped as DCP writes it
            return None, f"is damaged ({_reason(e)})"
        return (extra, None) if problem is None else (None, f"does not fit this model ({problem})")

    def load_latest(self, model, optimizer, log=lambda m: print(m, file=sys.stderr),
                    at_most: int | None = None) -> dict | None:
        """Restore the newest fitting checkpoint (of step at_most or earlier) into model and optimizer;
        its extra dict with "path" added, or None if there is none."""
        candidates = self._candidates(at_most, log) if self.rank == 0 else None
        while True:
            choice = [next(candidates, None) if self.rank == 0 else None]
            if dist.is_initialized():
                dist.broadcast_object_list(choice, src=0)
            if (path := choice[0]) is None:
                return None
            extra, problem = self._fits(path, model, optimizer)
            if dist.is_initialized():  # a rank's own extra file may differ: all skip, or none
                problems = [None] * dist.get_world_size()
                dist.all_gather_object(problems, problem)
                problem = next((p for p in problems if p is not None), None)
            if problem is None:
                break
            if self.rank == 0:
                log(f"checkpoint {path.name} {problem}; trying an older one")
        try:
            self._restore(path, extra, model, optimizer)
        except MoecError:
            raise
        except (Exception, CheckpointException) as e:
            raise MoecError(f"loading checkpoint {path} failed ({_reason(e)}) after its metadata matched this "
                            f"model: the model and optimizer may be partly overwritten, so the run stops; move "
                            f"{path.name} aside to resume from an older checkpoint") from e
        return {**extra, "path": path}

    def _restore(self, path: Path, extra: dict, model, optimizer) -> None:
        if extra["layout"] == "by_name":
            by_name.load(path, unwrap(model), optimizer, self.mesh, self.split)  # resharded to this run's EP, TP
            for group, saved in zip(optimizer.param_groups, extra["param_groups"], strict=True):
                group.update(saved)
        else:
            msd, osd = get_state_dict(model, optimizer)
            state = {"model": msd, "optim": osd}
            by_name.load_state(state, path)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
