"""Compile time and peak memory of `moec compile` for several model sizes.

Each compile runs in a fresh process (wall time, and peak RSS from the
kernel's accounting of that child). The dense models are built on the meta
device, so the figures measure the compiler, not weight initialisation.

    python bench/compile.py            # prints a markdown table
"""
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = [  # (model file, config, experts, topk)
    ("examples/llama.py", "1b", 8, 2),
    ("examples/llama.py", "7b", 64, 8),
    ("examples/llama.py", "mistral-7b", 8, 2),
    ("examples/llama.py", "70b", 64, 8),
    ("examples/gpt.py", "1.3b", 64, 8),
]


def measure(model, config, experts, topk):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "moec.driver.cli", "compile", str(ROOT / model), "--config", config,
               "--experts", str(experts), "--topk", str(topk), "-o", f"{tmp}/out"]
        t = time.perf_counter()
        pid = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = pid.stdout.read()
        _, status, usage = os.wait4(pid.pid, 0)
        seconds = time.perf_counter() - t
        if status != 0:
            raise SystemExit(f"{model} {config} failed:\n{output}")
        params = json.loads(Path(f"{tmp}/out/config.json").read_text())["result"]["params"]
    return seconds, usage.ru_maxrss / 2**20, params / 1e9  # s, GiB, B params


def main():
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}")
    import torch
    print(f"torch {torch.__version__}\n")
    print("| model | config | experts / top-k | MoE params | compile time | peak RSS |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model, config, experts, topk in CASES:
        seconds, gib, billions = measure(model, config, experts, topk)
        print(f"| {Path(model).stem} | {config} | {experts} / {topk} | {billions:,.1f} B | {seconds:.1f} s | "
              f"{gib:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
