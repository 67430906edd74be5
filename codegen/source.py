"""Generated kernel modules: naming, caching by configuration, loading, writing.

A generator turns a frozen configuration into Python source: a standalone
module (it imports only torch, triton and moec) holding the Triton kernels,
their host wrappers and the torch.library ops it registers on import. The
module name spells the configuration, so one name is one source. Sources are
cached in memory by configuration (the generators are lru_cached); `load`
writes a source once to the user's cache folder, because Triton reads a
kernel's text from its file, and imports it from there.
"""
import importlib.util
import os
import sys
from pathlib import Path

import torch

import moec

# torch dtype -> (short name used in module names, Triton pointer type, tl dtype)
DTYPES = {
    torch.bfloat16: ("bf16", "*bf16", "tl.bfloat16"),
    torch.float16: ("fp16", "*fp16", "tl.float16"),
    torch.float32: ("fp32", "*fp32", "tl.float32"),
}
BY_NAME = {short: dtype for dtype, (short, _, _) in DTYPES.items()}


def dtype_name(dtype: torch.dtype, what: str) -> str:
    if dtype not in DTYPES:
        raise moec.MoecError(f"{what} has dtype {dtype}; generated kernels take bfloat16, float16 or float32: "
                             f"cast it or leave this op unlowered")
    return DTYPES[dtype][0]


def tl_dtype(short: str) -> str:
    return DTYPES[BY_NAME[short]][2]


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def split_launch(row: dict) -> tuple[dict, dict]:
    """A LAUNCH row -> (sizes: its UPPERCASE keys, Triton launch options: the others)."""
    return {k: v for k, v in row.items() if k.isupper()}, {k: v for k, v in row.items() if not k.isupper()}


def cache_dir() -> Path:
    root = os.environ.get("MOEC_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moec" / "kernels"


def _write_once(path: Path, source: str) -> None:
    if path.exists() and path.read_text() == source:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # write-then-rename: ranks of one job may generate the same module at once
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(source)
    os.replace(tmp, path)


def load(name: str, source: str):
    """Import a generated module (registering its ops); the same name and source load once per process."""
    key = f"moec_generated_{name}"
    mod = sys.modules.get(key)
    if mod is not None and mod.SOURCE == source:
        return mod
    path = cache_dir() / f"{name}.py"
    _write_once(path, source)
    spec = importlib.util.spec_from_file_location(key, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    mod.SOURCE = source
    return mod


def write(build_dir, sources: dict[str, str]) -> list[Path]:
    """Write {module_name: source} to build_dir/kernels/<module_name>.py; returns the paths."""
    out = Path(build_dir) / "kernels"
    paths = []
    for name, text in sorted(sources.items()):
        paths.append(out / f"{name}.py")
        _write_once(paths[-1], text)
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
