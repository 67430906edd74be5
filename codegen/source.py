"""What the kernel generators share: dtype names, the text pieces every
generated module holds, and writing the sources into a build.

A generator turns a frozen configuration into Python source: a standalone
module (it imports only torch, triton and moec.runtime) holding the Triton
kernels, their host wrappers and the torch.library ops it registers on import.
The module name spells the configuration, so one name is one source. Sources
are cached in memory by configuration (the generators are lru_cached); `load`
(moec.runtime.kernels.generated) imports one.
"""
from pathlib import Path

import torch

from moec.base.errors import MoecError
from moec.runtime.kernels.generated import load_source as load, write_once

# torch dtype -> (short name used in module names, Triton pointer type, tl dtype)
DTYPES = {
    torch.bfloat16: ("bf16", "*bf16", "tl.bfloat16"),
    torch.float16: ("fp16", "*fp16", "tl.float16"),
    torch.float32: ("fp32", "*fp32", "tl.float32"),
}
BY_NAME = {short: dtype for dtype, (short, _, _) in DTYPES.items()}


def dtype_name(dtype: torch.dtype, what: str) -> str:
    if dtype not in DTYPES:
        raise MoecError(f"{what} has dtype {dtype}; generated kernels take bfloat16, float16 or float32: "
                        f"cast it or leave this op unlowered")
    return DTYPES[dtype][0]


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def write(build_dir, sources: dict[str, str]) -> list[Path]:
    """Write {module_name: source} to build_dir/kernels/<module_name>.py; returns the paths."""
    out = Path(build_dir) / "kernels"
    paths = []
    for name, text in sorted(sources.items()):
        paths.append(out / f"{name}.py")
        write_once(paths[-1], text)
    return paths


# The op registration every generated module ends with; a second import of the
# same module (build dir and compiler cache) finds the ops already there.
REGISTER_GUARD = '''
if not hasattr(torch.ops.moec_kernels, NAME):
    _register()
OP = getattr(torch.ops.moec_kernels, NAME).default
'''


# fp32 -> dtype inside a kernel, dtype being a pointer's element type. bf16
# rounds to nearest even spelled out in integer ops, so every backend (the CPU
# interpreter too, which truncates) rounds alike.
CAST_TO = '''
@triton.jit
def cast_to(x, dtype: tl.constexpr):
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # low half cleared: the cast below is exact
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(dtype)
'''
