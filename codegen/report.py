"""`moec kernels report`: per generated kernel and target, registers, spills and
shared memory (LDS on AMD), read from the compiled kernel; no GPU needed.

The kernel generators and the hand-written runtime kernels each have a
`portable_specs(arch_name)` hook; each spec is (name, jit_fn, signature,
constexprs, launch_options) and is built with cross_compile.compile_for. AMD figures come from the amdgcn assembly's resource notes;
NVIDIA's from `ptxas -v` over the PTX Triton produced (the one it ships).
"""
import importlib
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import click


SPEC_MODULES = ("moec.codegen.gating", "moec.codegen.permute", "moec.codegen.routing",
                "moec.runtime.kernels.grouped_gemm")


def spec_modules() -> list:
    """The modules whose kernels every target must compile."""
    return [importlib.import_module(name) for name in SPEC_MODULES]


def _ptxas() -> str:
    """The ptxas Triton itself uses for sm90 (newer Triton releases pick a newer one per arch)."""
    from triton.backends.nvidia import compiler as nv

    try:
        tool = nv.get_ptxas(90)
    except TypeError:
        tool = nv.get_ptxas()
    return getattr(tool, "path", None) or shutil.which("ptxas")


def _amd_resources(asm: str) -> dict:
    def field(pattern):
        m = re.search(pattern, asm)
        return int(m.group(1)) if m else 0

    return {"registers": field(r"; NumVgprs: (\d+)"),
            "spills": field(r"\.vgpr_spill_count:\s+(\d+)") + field(r"\.sgpr_spill_count:\s+(\d+)"),
            "scratch": field(r"; ScratchSize: (\d+)")}


def _nvidia_resources(ptx: str) -> dict:
    target = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([_ptxas(), "-v", f"--gpu-name={target}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    frame = re.search(r"(\d+) bytes stack frame", out)
    return {"registers": int(regs.group(1)) if regs else 0, "spills": sum(spill),
            "scratch": int(frame.group(1)) if frame else 0}


def _fp_fusion() -> bool:
    """What a launch that does not choose gets (Triton's default, or TRITON_DEFAULT_FP_FUSION), chosen here:
    left unchosen, Triton 3.9 prints a warning that its default will change above the report."""
    import triton

    return getattr(getattr(getattr(triton, "knobs", None), "language", None), "default_fp_fusion", True)


def compile_all(archs) -> list[dict]:
    """One row per (kernel, target): registers, spills (bytes on NVIDIA, registers on AMD), scratch, shared."""
    from moec.codegen.cross_compile import compile_for
    from moec.runtime.kernels.launch import LDS_LIMIT

    rows, fusion = [], _fp_fusion()
    for mod in spec_modules():
        for arch in archs:
            for name, fn, signature, constexprs, options in mod.portable_specs(arch):
                k = compile_for(fn, signature, constexprs, arch, {"enable_fp_fusion": fusion, **options})
                res = _amd_resources(k.asm["amdgcn"]) if arch.startswith("gfx") else _nvidia_resources(k.asm["ptx"])
                rows.append(dict(module=mod.__name__.rsplit(".", 1)[-1], kernel=name, arch=arch,
                                 shared=k.metadata.shared, shared_limit=LDS_LIMIT[arch], **res))
    return rows


@click.group("kernels")
def kernels():
    """Generated Triton kernels."""


@kernels.command("report")
@click.option("--arch", "archs", multiple=True, help="gfx90a, gfx942 or sm90 (repeatable; default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def report(archs, as_json):
    """Registers, spills and shared memory/LDS of every generated kernel, per target."""
    from moec.runtime.kernels.launch import TARGETS

    archs = archs or tuple(TARGETS)
    rows = compile_all(archs)
    if as_json:
        click.echo(json.dumps(rows))
        return
    width = max(len(r["kernel"]) for r in rows) if rows else 6
    click.echo(f"{'kernel':<{width}}  {'target':<7} {'regs':>5} {'spills':>6} {'scratch':>7} {'shared':>7}")
    for r in rows:
        click.echo(f"{r['kernel']:<{width}}  {r['arch']:<7} {r['registers']:>5} {r['spills']:>6} {r['scratch']:>7} "
                   f"{r['shared']:>7}")


if __name__ == "__main__":
    kernels()
