"""Run worker.py under torchrun and read what rank 0 wrote."""
import json
import os
import subprocess
from pathlib import Path

from tests.launcher import TORCHRUN

ROOT = Path(__file__).resolve().parents[2]


def torchrun(nproc: int, job: dict, tmp: Path, timeout: int = 240) -> dict:
    job_file, out = tmp / f"job{nproc}.json", tmp / f"out{nproc}.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).with_name("worker.py")), str(out), str(job_file)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(out.read_text())
