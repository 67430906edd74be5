"""The layering of the package, from the import statements of every source file (AST):

    base      errors, graph helpers               imports nothing of moec above it
    runtime   what an emitted program imports     base
    cost_model                                    base, and no torch
    codegen   kernel generators, emitters         base, runtime
    passes                                        base, runtime, codegen, cost_model
    driver    CLI, capture, compiler, pipeline    anything; nothing imports it

and no two folders import each other, directly or round a loop.
"""
import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"moec": ROOT / "moec", "moec.passes": ROOT / "passes", "moec.codegen": ROOT / "codegen",
                "moec.cost_model": ROOT / "cost_model"}
ALLOWED = {
    "base": {"base"},
    "runtime": {"base", "runtime"},
    "cost_model": {"base", "cost_model"},
    "codegen": {"base", "runtime", "codegen"},
    "passes": {"base", "runtime", "codegen", "cost_model", "passes"},
    "driver": {"base", "runtime", "codegen", "cost_model", "passes", "driver"},
}


def _modules() -> dict[str, Path]:
    """Every module of the installed package: dotted name -> file."""
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "moec" and parts and parts[0] in ("passes", "codegen", "cost_model"):
                continue  # not there: those are the top-level folders
            out[name] = path
    return out


MODULES = _modules()


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "base":
        return "base"  # moec/__init__.py re-exports MoecError and nothing else
    return parts[1]


def _resolve(name: str) -> str:
    """The longest prefix of a dotted name that is a module of the package."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports(module: str) -> list[tuple[str, int]]:
    """(imported moec module, line) for every import statement, at any depth of the file."""
    tree = ast.parse(MODULES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{MODULES[module]}:{node.lineno}: a relative import; name the module"
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out += [(_resolve(n), node.lineno) for n in names if n == "moec" or n.startswith("moec.")]
    return out


def test_every_import_points_down_or_sideways():
    wrong = [f"{MODULES[m].relative_to(ROOT)}:{line} ({layer(m)}) imports {target} ({layer(target)})"
             for m in MODULES for target, line in imports(m) if layer(target) not in ALLOWED[layer(m)]]
    assert not wrong, "\n".join(wrong)


def test_the_rules_catch_an_upward_import():
    assert "driver" not in ALLOWED["runtime"] and "passes" not in ALLOWED["codegen"]
    assert layer("moec.runtime.training.loop") == "runtime" and layer("moec") == "base"
    assert _resolve("moec.runtime.ops.moe.capacity") == "moec.runtime.ops.moe"


def test_no_import_cycle_between_folders():
    graph = nx.DiGraph()
    for m, path in MODULES.items():
        for target, _ in imports(m):
            a, b = path.parent.relative_to(ROOT), MODULES[target].parent.relative_to(ROOT)
            if a != b:
                graph.add_edge(str(a), str(b))
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, cycles


def _python(code: str) -> str:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_runtime_imports_no_compiler_module():
    loaded = _python("import sys, moec.runtime; print(' '.join(sorted(sys.modules)))").split()
    compiler = [m for m in loaded if m.split(".")[:2] in (["moec", "driver"], ["moec", "passes"],
                                                          ["moec", "codegen"], ["moec", "cost_model"])]
    assert "moec.runtime.training.loop" in loaded and not compiler, compiler


def test_cost_model_imports_without_torch():
    names = [m for m in MODULES if layer(m) == "cost_model"]
    _python("import sys; sys.modules['torch'] = None\n" + "".join(f"import {m}\n" for m in names))


@pytest.mark.parametrize("generator", ["gating", "permute", "routing"])
def test_generated_kernels_import_only_the_runtime(generator):
    import importlib

    gen = importlib.import_module(f"moec.codegen.{generator}")
    sources = [gen.source(cfg[0] if isinstance(cfg, tuple) else cfg) for cfg in gen.PORTABLE]
    for text in sources:
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for n in names:
                    assert n.split(".")[0] in ("functools", "typing", "torch", "triton", "moec"), n
                    assert n == "moec" or n.startswith("moec.runtime") or not n.startswith("moec"), n
