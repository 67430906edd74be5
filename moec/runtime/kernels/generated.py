"""Loading generated kernel modules: from the compiler's cache while a build is
compiled, from a build's kernels/ folder when its model.py is imported.

A generated module is standalone Python (it imports torch, triton and
moec.runtime only) that registers its torch.library ops on import. Triton
reads a kernel's text from its file, so a source held in memory is written to
the user's cache folder once and imported from there.
"""
import importlib.util
import os
import sys
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("MOEC_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moec" / "kernels"


def write_once(path: Path, source: str) -> None:
    if path.exists() and path.read_text() == source:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # write-then-rename: ranks of one job may generate the same module at once
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(source)
    os.replace(tmp, path)


def import_file(key: str, path: Path):
    spec = importlib.util.spec_from_file_location(key, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod


def load_source(name: str, source: str):
    """Import a generated module held in memory (registering its ops); the same name and source load once
    per process."""
    key = f"moec_generated_{name}"
    mod = sys.modules.get(key)
    if mod is not None and getattr(mod, "SOURCE", None) == source:
        return mod
    path = cache_dir() / f"{name}.py"
    write_once(path, source)
    mod = import_file(key, path)
    mod.SOURCE = source
    return mod


def load_build(build_dir, names) -> None:
    """Import the generated modules a build's model.py calls, from build_dir/kernels/."""
    for name in names:
        import_file(f"kernels.{name}", Path(build_dir) / "kernels" / f"{name}.py")
