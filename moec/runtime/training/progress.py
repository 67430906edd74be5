"""Progress on stderr and metrics in RUN_DIR/metrics.jsonl (rank 0 only).

On a terminal the bar redraws in place every step; otherwise (a log file, a
batch job) it prints one line every `every` steps so logs stay readable. Its
tokens/s is the metrics line's: tokens over seconds of the steps since the last
metrics line, the first step of the process (warm-up) and the step whose
kernels are counted (under the profiler) left out.
"""
import json
import sys
import time
from pathlib import Path

from moec.base.errors import MoecError
from moec.base.files import replace_file


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, start: int, every: int, stream=sys.stderr, enabled: bool = True):
        self.total, self.start, self.every, self.stream, self.enabled = total, start, every, stream, enabled
        self.tty = stream.isatty()
        self.t0 = None
        self.window_steps, self.window_seconds_per_token = 0, 0.0
        self.loss = None

    def update(self, step: int, loss: float | None, tokens_per_s: float | None) -> None:
        """Called after step `step` (0-based) finished in tokens / tokens_per_s seconds, tokens_per_s None for
        a step the rates leave out; loss None between the steps that read it (the bar shows the last one
        read)."""
        if not self.enabled:
            return
        self.loss = self.loss if loss is None else loss
        if self.t0 is None:  # the first step compiles and warms up: time from its end
            self.t0, self.first = time.perf_counter(), step + 1
        elif tokens_per_s is not None:
            self.window_steps += 1
            self.window_seconds_per_token += 1 / tokens_per_s
        done = step + 1
        # every step has the same tokens: the window's tokens over its seconds is the harmonic mean of the rates
        shown = f"{self.window_steps / self.window_seconds_per_token:,.0f}" if self.window_steps else "?"
        rate = (done - self.first) / max(time.perf_counter() - self.t0, 1e-9)
        eta = _duration((self.total - done) / rate) if rate > 0 else "?"
        width = 24
        fill = int(width * done / self.total)
        shown_loss = "?" if self.loss is None else f"{self.loss:.4f}"
        line = (f"[{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} loss {shown_loss} "
                f"{shown} tok/s ETA {eta}")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K" + ("\n" if done == self.total else ""))
        elif done % self.every == 0 or done == self.total:
            self.stream.write(line + "\n")
        self.stream.flush()
        if done % self.every == 0:  # the metrics line of this step closed the window
            self.window_steps, self.window_seconds_per_token = 0, 0.0

    def message(self, text: str) -> None:
        """A line of its own that the bar does not overwrite."""
        if self.enabled:
            self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
            self.stream.flush()


class MetricsFile:
    """Appends one JSON record a line; on resume, drops records past the resumed step
    so a killed run's tail is not counted twice."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        if resume_step is None or not self.path.exists():
            self.path.write_text("")
        else:
            keep = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            replace_file(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A run killed mid-append (a full disk, SIGKILL) leaves a cut last
    line: it is dropped with a warning. An unreadable line before the last is damage, not a cut: an error."""
    lines = Path(path).read_text(errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < last:
                raise MoecError(f"{path}:{i + 1}: not a JSON record ({e.msg}); the file is damaged") from None
            print(f"warning: {path}:{i + 1}: dropped a cut last record (the run was killed while writing it)",
                  file=sys.stderr)
    return records
