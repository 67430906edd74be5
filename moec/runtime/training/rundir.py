"""What a run dir is: the home of one run of one model, recorded in RUN_DIR/run.json
(the build, its parameter fingerprint and the flags of the run's last start).

A fresh start in a run dir that holds a run is refused, so a new run cannot
prune the old run's checkpoints or cut its metrics: continue it with --resume,
or start over with --overwrite (which deletes what train.py wrote there).
--resume of another model's run is refused. A resume applies the flags it is
given from the resumed step on; run.json tells which of them changed.
"""
import json
import shutil
import tempfile
from pathlib import Path

from moec.base.errors import MoecError
from moec.base.files import replace_file

RECORD = "run.json"
WRITTEN = ("checkpoints", "abandoned", "metrics.jsonl", "final.safetensors", RECORD)  # what --overwrite deletes
# flags that do not change what the run computes
NOT_RECORDED = {"resume", "resume_from", "overwrite", "run_dir", "log_every", "device", "debug_nan_at_step"}


def _flags(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_RECORDED}


class RunDir:
    def __init__(self, path: Path, fingerprint: str, build_dir: Path):
        self.path, self.fingerprint, self.build_dir = Path(path), fingerprint, Path(build_dir)

    def _record(self) -> dict | None:
        try:
            return json.loads((self.path / RECORD).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise MoecError(f"{self.path / RECORD} is unreadable ({type(e).__name__}): move the run dir aside "
                            f"or pass --overwrite") from e

    def _used(self) -> list[str]:
        """What a run left here (a start that failed before its first step leaves nothing that counts)."""
        p = self.path
        found = [f"{len(list((p / 'checkpoints').glob('step_*')))} checkpoint(s)"] \
            if any((p / "checkpoints").glob("step_*")) else []
        found += [n for n in ("metrics.jsonl", "final.safetensors") if (p / n).is_file() and (p / n).stat().st_size]
        return found + (["abandoned/"] if (p / "abandoned").exists() else [])

    def claim(self, args) -> dict:
        """Check the run dir fits what this start asks and record the start (rank 0 only: the other ranks
        are stopped with it when it refuses); the flags of the run's previous start ({} for a fresh run)."""
        record = self._record()
        resume = args.resume or args.resume_from is not None
        if resume and record is not None and record["fingerprint"] != self.fingerprint:
            raise MoecError(f"--resume: {self.path} is a run of another model (built in {record['build']}); "
                            f"pass the --run-dir of this build's run")
        if not resume and self._used():
            if not args.overwrite:
                raise MoecError(f"{self.path} holds a run already ({', '.join(self._used())}): pass --resume to "
                                f"continue it, --overwrite to delete it and start over, or another --run-dir")
            for name in WRITTEN:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            record = None
        self._writable()
        replace_file(self.path / RECORD, json.dumps({"build": str(self.build_dir), "fingerprint": self.fingerprint,
                                                     "flags": _flags(args)}, indent=1))
        return record["flags"] if record else {}

    def _writable(self) -> None:
        """A run dir (or its checkpoints dir) that cannot be written is found now, not at the first save."""
        for d in (self.path, self.path / "checkpoints"):
            try:
                if d == self.path or d.exists():
                    d.mkdir(parents=True, exist_ok=True)
                    tempfile.TemporaryFile(dir=d).close()
            except OSError as e:
                raise MoecError(f"cannot write to {d} ({e.strerror or e}): pass a writable --run-dir") from e


def changed_flags(before: dict, args) -> list[str]:
    """'--lr 0.0003 -> 0.0001' for each recorded flag this start gives another value."""
    now = _flags(args)
    return [f"--{k.replace('_', '-')} {before[k]} -> {v}" for k, v in now.items() if k in before and before[k] != v]
