"""The grouped GEMM kernels cross-compile for gfx90a, gfx942 and sm90 with no
GPU, within each target's shared memory (LDS) and on its matrix units. The
compile runs in a fresh interpreter: Triton's interpreter mode, which other
test modules switch on for the whole process, cannot compile."""
import json
import os
import subprocess
import sys

import pytest

from moec.runtime.kernels.launch import LDS_LIMIT

SCRIPT = """
import json, sys
from moec.codegen.cross_compile import compile_for
from moec.runtime.kernels import grouped_gemm as gg
target = sys.argv[1]
out = []
for name, fn, sig, consts, opts in gg.portable_specs(target):
    k = compile_for(fn, sig, consts, target, opts)
    asm = k.asm["amdgcn"] if target.startswith("gfx") else k.asm["ptx"]
    out.append([name, k.metadata.shared, ("mfma" if target.startswith("gfx") else "wgmma") in asm])
print(json.dumps(out))
"""


@pytest.mark.parametrize("target", ["gfx90a", "gfx942", "sm90"])
def test_cross_compiles_within_shared_memory(target):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, target], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    kernels = {name: (shared, mma) for name, shared, mma in json.loads(run.stdout.strip().splitlines()[-1])}
    assert {"grouped_mm_fwd_glu_silu", "grouped_mm_bwd_glu_silu", "grouped_wgrad", "glu_rows_bwd_silu"} <= set(kernels)
    for name, (shared, mma) in kernels.items():
        assert shared <= LDS_LIMIT[target], name
        if name.startswith("grouped_"):  # the GEMMs: pipelined through shared memory, on the matrix units
            assert shared > 0 and mma, name
