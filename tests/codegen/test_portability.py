"""Every generated kernel of every codegen module with a portable_specs hook compiles, with no GPU, for
hip gfx90a and gfx942 and cuda sm90, within the target's shared memory / LDS; the routing kernels spill
nothing. Compiled in fresh processes: Triton's interpreter (other tests' CPU mode) cannot compile."""
import json
import os
import subprocess
import sys

from moec.codegen import report
from moec.runtime.kernels.launch import TARGETS

ROUTING_MODULES = {"gating", "routing", "permute"}


def _compile(a):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import json; from moec.codegen.report import compile_all; print(json.dumps(compile_all([{a!r}])))"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)


def test_every_kernel_compiles_for_every_target():
    procs = {a: _compile(a) for a in TARGETS}
    rows = []
    for a, p in procs.items():
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"cross-compiling for {a} failed"
        rows += json.loads(out.strip().splitlines()[-1])
    modules = {m.__name__.rsplit(".", 1)[-1] for m in report.spec_modules()}
    assert ROUTING_MODULES <= modules
    for m in modules:
        per_arch = {a: sum(r["module"] == m and r["arch"] == a for r in rows) for a in TARGETS}
        assert min(per_arch.values()) > 0 and len(set(per_arch.values())) == 1, (m, per_arch)
    for r in rows:
        assert r["shared"] <= r["shared_limit"], r
        assert r["registers"] > 0, r
        if r["module"] in ROUTING_MODULES:
            assert r["spills"] == 0 and r["scratch"] == 0, r
