"""Per-architecture launch settings for every generated kernel, and the
cross-compiler that builds a kernel for a target with no GPU present.

One table: LAUNCH[kernel][arch] -> keyword launch options (num_warps,
num_stages, waves_per_eu, block sizes, ...). Arch names: "gfx90a" (MI250X),
"gfx942" (MI300X), "sm90" (H100/H200). AMD wavefronts are 64 lanes, so a
num_warps there buys twice the lanes it buys on NVIDIA; LDS is 64 KiB per CU.
Kernel modules add their own rows; nothing else in the tree holds launch
constants.
"""
import functools

TARGETS = {
    "gfx90a": ("hip", "gfx90a", 64),
    "gfx942": ("hip", "gfx942", 64),
    "sm90": ("cuda", 90, 32),
}
LDS_LIMIT = {"gfx90a": 64 * 1024, "gfx942": 64 * 1024, "sm90": 227 * 1024}

LAUNCH: dict[str, dict[str, dict]] = {}


def launch(kernel: str, arch: str) -> dict:
    """Launch options of a kernel on an arch (the sm90 row when the arch has none)."""
    rows = LAUNCH[kernel]
    return dict(rows.get(arch, rows["sm90"]))


@functools.lru_cache(maxsize=None)
def device_arch(device_index: int = 0) -> str:
    """Arch name of a visible GPU, as the table keys it."""
    import torch

    props = torch.cuda.get_device_properties(device_index)
    if getattr(torch.version, "hip", None):
        return props.gcnArchName.split(":")[0]
    return f"sm{props.major}{props.minor}"


def compile_for(fn, signature: dict, constexprs: dict, arch: str, options: dict):
    """Compile a @triton.jit function for `arch` without a GPU; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget(*TARGETS[arch])
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                          options=options)
