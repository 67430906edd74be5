"""Build a Triton kernel for a GPU target on a machine with no GPU: how CI keeps
every kernel compiling for AMD (gfx90a, gfx942; wave64) and NVIDIA (sm90)."""
from moec.runtime.kernels.launch import TARGETS


def compile_for(fn, signature: dict, constexprs: dict, arch: str, options: dict):
    """Compile a @triton.jit function for `arch` without a GPU; returns the CompiledKernel.
    options may hold "aligned": names of arguments the launcher guarantees divisible
    by 16 (pointers 16-byte aligned), as Triton's JIT specializes them at run time;
    without that hint loads are neither vectorized nor software-pipelined."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = dict(options)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in options.pop("aligned", ())}
    target = GPUTarget(*TARGETS[arch])
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), target=target,
                          options=options)
