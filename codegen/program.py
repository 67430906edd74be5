"""Emit the compiled model as a readable Python module, and its weights.

model.py holds one nn.Module class: a table of parameter and buffer shapes,
the names that share a parameter (tied embeddings), and the graph's forward
as fx prints it. It imports torch and moec.runtime only, plus whatever the
graph calls: generated kernel modules, and, when the torch.fx.symbolic_trace
front-end kept some of the model's own operators or functions opaque, the
model file itself (copied into the build as source/).
"""
import sys
import textwrap
from pathlib import Path

import torch.fx
from torch.fx.graph_module import _format_import_statement
from torch.package import sys_importer

HEADER = '''"""{title}

Written by `moec compile`; see config.json for the options and ir/ for how
each pass got here. Every name below is a parameter or buffer of the model.
"""
'''


def _dtype(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def _tables(gm):
    seen, params, tied = {}, {}, {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied[name] = seen[id(p)]
        else:
            seen[id(p)] = name
            params[name] = (tuple(p.shape), _dtype(p))
    buffers = {n: (tuple(b.shape), _dtype(b)) for n, b in gm.named_buffers()}
    return params, buffers, tied


def _table(name, rows: dict) -> str:
    body = "".join(f"    {k!r}: {v!r},\n" for k, v in rows.items())
    return f"{name} = {{\n{body}}}\n"


KERNEL_LOADER = '''
# generated Triton kernels in kernels/ beside this file; importing them registers their ops
moec.runtime.load_kernels(Path(__file__).parent, KERNELS)
'''


USER_LOADER = '''
# the graph's opaque calls go to the original model file's operators and functions: load it
_spec = importlib.util.spec_from_file_location({name!r}, Path(__file__).parent / {path!r})
_user = sys.modules.get(_spec.name)
if _user is None:
    _user = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_user)
'''


def model_source(gm: torch.fx.GraphModule, title: str, kernels=(), user: tuple[str, str] | None = None) -> str:
    """`user`: (module name, path in the build) of the model file, for graphs that call into it."""
    code = gm.graph.python_code(root_module="self")
    imports = sorted({_format_import_statement(n, o, sys_importer) for n, o in code.globals.items()})
    if kernels or user:  # both load files that sit beside model.py
        imports += [*(["import importlib.util", "import sys"] if user else []), "from pathlib import Path"]
    if user:
        imports.append(USER_LOADER.format(name=user[0], path=user[1]))
    params, buffers, tied = _tables(gm)
    forward = textwrap.indent(code.src.strip("\n"), "    ")
    return "\n".join([
        HEADER.format(title=title),
        *imports,
        "import moec.runtime",
        *(["", f"KERNELS = {list(kernels)!r}", KERNEL_LOADER] if kernels else []),
        "\n",
        _table("PARAMS", params),
        _table("BUFFERS", buffers),
        _table("TIED", tied),
        "\nclass Model(torch.nn.Module):",
        "    def __init__(self, device='cpu'):",
        "        super().__init__()",
        "        moec.runtime.declare(self, PARAMS, BUFFERS, TIED, device)",
        "",
        forward,
        "",
    ])


def write_weights(gm: torch.nn.Module, path: Path) -> None:
    """Every parameter once (tied names share one entry) and every buffer, persistent or not."""
    from safetensors.torch import save_file

    params, buffers, _ = _tables(gm)
    state = dict(gm.named_parameters(remove_duplicate=False)) | dict(gm.named_buffers())
    save_file({n: state[n].detach().contiguous() for n in [*params, *buffers]}, str(path))
