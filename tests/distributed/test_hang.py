"""A rank that freezes (SIGSTOP) mid-run: under torchrun (gloo, 2 CPU processes) the other rank ends
within the process-group timeout, with one line naming the frozen rank, instead of waiting gloo's
default 30 minutes. The collective runs on the default group and on a subgroup (an EP or FSDP mesh's)."""
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.launcher import TORCHRUN

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 3

WORKER = f'''
import os, signal, sys
from pathlib import Path
import torch, torch.distributed as dist
from moec.runtime.training.loop import run_main, setup_distributed

def main(args):
    group_kind, out = args
    env = setup_distributed(0, "cpu", timeout_s={TIMEOUT_S})
    Path(out, f"pid{{env.rank}}").write_text(str(os.getpid()))
    group = dist.new_group([0, 1]) if group_kind == "subgroup" else None
    dist.all_reduce(torch.ones(1), group=group)  # both ranks are up
    if env.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen, as by a debugger or a stuck driver call
    dist.all_reduce(torch.ones(1), group=group)
    return 0

sys.exit(run_main(main, sys.argv[1:]))
'''


def _pid(tmp: Path, rank: int) -> int | None:
    f = tmp / f"pid{rank}"
    return int(f.read_text()) if f.is_file() and f.read_text() else None


def _ps(pid: int, field: str) -> str:
    """One field of `ps` for the process: "" once it is gone."""
    ps = subprocess.run(["ps", "-ww", "-o", f"{field}=", "-p", str(pid)], capture_output=True, text=True)
    return ps.stdout.strip()


def _running(pid: int) -> bool:
    """Alive and not a zombie (torchrun reaps its workers only now and then)."""
    return _ps(pid, "stat")[:1] not in ("", "Z")


def _kill(pid: int | None, script: Path) -> None:
    try:  # only our own worker: its pid could have been reused by now
        if pid and str(script) in _ps(pid, "args"):
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("group", ["default", "subgroup"])
def test_a_stopped_rank_ends_the_run_with_a_line_naming_it(tmp_path, group):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script), group, str(tmp_path)]
    t0 = time.monotonic()
    launcher = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(launcher.stderr), daemon=True)
    reader.start()
    try:
        error = None
        while error is None and time.monotonic() - t0 < 60 and launcher.poll() is None:
            error = next((x for x in list(lines) if x.startswith("error: rank 0:")), None)
            time.sleep(0.2)
        assert error is not None, "".join(lines)[-4000:]
        assert error.strip() == (f"error: rank 0: a collective waited {TIMEOUT_S} s for rank 1, which did not arrive "
                                 f"(stopped, hung or dead); the run is stopped — resume it with --resume")
        rank0 = _pid(tmp_path, 0)
        while _running(rank0) and time.monotonic() - t0 < 60:  # it exits, not just prints
            time.sleep(0.2)
        assert not _running(rank0), "rank 0 printed its error but did not exit"
        assert _running(_pid(tmp_path, 1))  # still frozen: rank 0 ended on its own
        _kill(_pid(tmp_path, 1), script)  # else torchrun waits 30 s before it kills it
        assert launcher.wait(timeout=30) != 0
        reader.join(timeout=10)
        out = "".join(lines)
        assert re.search(rf"exitcode\s*:\s*1 \(pid: {rank0}\)", out), out[-4000:]  # torchrun's summary
        assert "Timed out waiting" not in out and "[rank0]" not in out  # one line, not gloo's traceback
    finally:
        for rank in (0, 1):
            _kill(_pid(tmp_path, rank), script)
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait(timeout=30)
