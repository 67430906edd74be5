"""Per-architecture launch settings of every Triton kernel moec runs, generated
or hand-written, in one table, and the lookup kernels use at run time.

LAUNCH[kernel][arch] -> keyword launch options (num_warps, num_stages,
waves_per_eu, block sizes, ...); UPPERCASE keys are the kernel's block-size
constexprs, the rest Triton launch options. Arch names: "gfx90a" (MI250X),
"gfx942" (MI300X), "sm90" (H100/H200). AMD wavefronts are 64 lanes, so a
num_warps there buys twice the lanes it buys on NVIDIA; LDS is 64 KiB per CU.
The cross-compiler that checks every row builds for a target with no GPU is
moec.codegen.cross_compile.
"""
import functools

TARGETS = {
    "gfx90a": ("hip", "gfx90a", 64),
    "gfx942": ("hip", "gfx942", 64),
    "sm90": ("cuda", 90, 32),
}
LDS_LIMIT = {"gfx90a": 64 * 1024, "gfx942": 64 * 1024, "sm90": 227 * 1024}

LAUNCH: dict[str, dict[str, dict]] = {}

# Grouped GEMM (kernels/grouped_gemm.py). AMD: ROCm's stream pipeliner wants
# num_stages=2, 16x16 MFMA (matrix_instr_nonkdim=16); tiles sized so two
# stages of A and B fit the 64 KiB LDS.
LAUNCH["grouped_mm"] = {
    "sm90": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "gfx942": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=2, waves_per_eu=2,
                   matrix_instr_nonkdim=16),
    "gfx90a": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2, waves_per_eu=2,
                   matrix_instr_nonkdim=16),
}
LAUNCH["grouped_mm_glu"] = {  # two accumulators (W1 and W3) per tile: half the N width
    # split_bwd: backward's dH as a plain GEMM plus an elementwise GLU kernel (the fused epilogue ran
    # at half the GEMM's rate on H100)
    "sm90": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, split_bwd=True),
    "gfx942": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=2, waves_per_eu=2,
                   matrix_instr_nonkdim=16),
    "gfx90a": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2, waves_per_eu=2,
                   matrix_instr_nonkdim=16),
}
LAUNCH["grouped_wgrad"] = {
    "sm90": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4),
    "gfx942": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=2, waves_per_eu=2,
                   matrix_instr_nonkdim=16),
    "gfx90a": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2, waves_per_eu=2,
                   matrix_instr_nonkdim=16),
}


def launch(kernel: str, arch: str) -> dict:
    """Launch options of a kernel on an arch (the sm90 row when the arch has none)."""
    rows = LAUNCH[kernel]
    return dict(rows.get(arch, rows["sm90"]))


def fit_shared(row: dict, arch: str, elem_size: int, b_tiles: int = 1) -> dict:
    """The row with num_stages, then BLOCK_N, lowered until its pipelined A and B tiles fit the arch's
    shared memory: the GEMM rows are tuned for 2-byte inputs, and 4-byte ones need half of it."""
    row, limit = dict(row), LDS_LIMIT.get(arch, LDS_LIMIT["sm90"])
    tile = lambda: row["BLOCK_K"] * (row["BLOCK_M"] + b_tiles * row["BLOCK_N"])
    need = lambda: row.get("num_stages", 1) * elem_size * tile()
    while need() > limit and row.get("num_stages", 1) > 1:
        row["num_stages"] -= 1
    while need() > limit and row["BLOCK_N"] > 16:
        row["BLOCK_N"] //= 2
    return row


def split(row: dict) -> tuple[dict, dict]:
    """A LAUNCH row -> (sizes: its UPPERCASE keys, Triton launch options: the others)."""
    return {k: v for k, v in row.items() if k.isupper()}, {k: v for k, v in row.items() if not k.isupper()}


def arch_of(device) -> str:
    """The arch name of a device; "sm90" off the GPU (the Triton interpreter)."""
    return device_arch(device.index or 0) if device.type == "cuda" else "sm90"



def for_tensor(kernel: str, t) -> tuple[dict, dict]:
    """(sizes, launch options) of a kernel for the GPU t lives on."""
    return split(launch(kernel, arch_of(t.device)))


@functools.lru_cache(maxsize=None)
def device_arch(device_index: int = 0) -> str:
    """Arch name of a visible GPU, as the table keys it."""
    import torch

    props = torch.cuda.get_device_properties(device_index)
    if getattr(torch.version, "hip", None):
        return props.gcnArchName.split(":")[0]
    return f"sm{props.major}{props.minor}"


# Gating, routing metadata, permute and unpermute (codegen/gating.py, routing.py,
# permute.py). All memory-bound: AMD rows halve num_warps (a wave64 warp has twice
# the lanes) and ask for 2 waves per SIMD to keep loads in flight. TILE is
# elements of a program's [tokens, experts] tile (tokens = TILE // padded E).
LAUNCH["gate_fwd"] = {
    "sm90": dict(TILE=2048, PROGRAMS_PER_SM=4, num_warps=4),  # H100 sweep (bench: 2048 x 4 x 4 fastest)
    "gfx942": dict(TILE=1024, PROGRAMS_PER_SM=8, num_warps=2, waves_per_eu=2),
    "gfx90a": dict(TILE=1024, PROGRAMS_PER_SM=8, num_warps=2, waves_per_eu=2),
}
LAUNCH["gate_stats"] = {  # BLOCK_C experts a program, so many programs share the partials' reading
    "sm90": dict(BLOCK_P=64, BLOCK_C=32, num_warps=4),
    "gfx942": dict(BLOCK_P=64, BLOCK_C=32, num_warps=2),
    "gfx90a": dict(BLOCK_P=64, BLOCK_C=32, num_warps=2),
}
LAUNCH["gate_bwd"] = {
    "sm90": dict(TILE=2048, num_warps=4),
    # 4 wavefronts: with 2, triton 3.6 spills the E=128 K=8 backward past the 256 VGPRs (3.9 does not)
    "gfx942": dict(TILE=2048, num_warps=4, waves_per_eu=2),
    "gfx90a": dict(TILE=2048, num_warps=4, waves_per_eu=2),
}
LAUNCH["route"] = {  # TILE: elements of a [slots, experts] tile, at most BLOCK_N slots; CHUNKS: programs
    "sm90": dict(TILE=4096, BLOCK_N=64, CHUNKS=1024, BLOCK_B=64, BLOCK_E=32, num_warps=4),
    # 4 wavefronts: with 2, triton 3.6 spills route_rows at E=256
    "gfx942": dict(TILE=4096, BLOCK_N=64, CHUNKS=1024, BLOCK_B=64, BLOCK_E=32, num_warps=4, waves_per_eu=2),
    "gfx90a": dict(TILE=4096, BLOCK_N=64, CHUNKS=1024, BLOCK_B=64, BLOCK_E=32, num_warps=4, waves_per_eu=2),
}
LAUNCH["glu_rows"] = {  # the grouped GEMM's elementwise GLU kernel (kernels/grouped_gemm_glu.py)
    "sm90": dict(BLOCK_R=16, BLOCK_C=256, num_warps=4),
    "gfx942": dict(BLOCK_R=16, BLOCK_C=256, num_warps=4),
    "gfx90a": dict(BLOCK_R=16, BLOCK_C=256, num_warps=4),
}
for _name in ("permute", "gather_sum", "unpermute_bwd"):  # [tokens, hidden] row-copy tiles
    LAUNCH[_name] = {
        "sm90": dict(BLOCK_T=8 if _name != "unpermute_bwd" else 4, BLOCK_D=512, num_warps=4),
        # wave64: half the warps for the same lanes, half the D block so K gathered rows fit the VGPRs
        "gfx942": dict(BLOCK_T=8 if _name != "unpermute_bwd" else 4, BLOCK_D=256, num_warps=2, waves_per_eu=2),
        "gfx90a": dict(BLOCK_T=8 if _name != "unpermute_bwd" else 4, BLOCK_D=256, num_warps=2, waves_per_eu=2),
    }
