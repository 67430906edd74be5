"""What `moec compile` is given, checked before the model is captured (seconds; a quarter minute for a
70B model): the build dir it may write, the files it reads and the dense weights' format."""
import json
import math
import pickle
import re
from pathlib import Path

import torch

from moec.base.errors import MoecError
from moec.base.options import Options

FORMATS = ("give a .safetensors file or a torch.save'd state dict of tensors "
           "(a checkpoint holding one under 'model' will do)")


def is_build(path: Path) -> bool:
    """Whether path holds a build `moec compile` wrote: its config.json names the moec that wrote it."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "moec_version" in config


def check_build_dir(out: Path, force: bool) -> None:
    """out may become the build: it is new, empty, or (with force) a build moec wrote."""
    if not out.exists():
        return
    if not out.is_dir():
        raise MoecError(f"-o {out} is a file, not a directory; name a directory for the build")
    if not any(out.iterdir()):
        return
    if not force:
        raise MoecError(f"{out} exists and is not empty; pass --force to replace it (its runs/ are kept)")
    if not is_build(out):
        raise MoecError(f"-o {out}: --force replaces only a build moec wrote, and {out} has no moec config.json; "
                        f"it is left as it is: name a new or empty directory")


def check_expert_parallel(o: Options) -> None:
    """--ep divides the routed experts of every MoE layer: --experts (and --pyramid's) times --granularity."""
    routed = sorted({e * o.granularity for e in [o.experts] + ([o.pyramid[0]] if o.pyramid else [])})
    if o.ep > 1 and not o.dense and any(e % o.ep for e in routed):
        times = " (--experts x --granularity)" if o.granularity > 1 else ""
        common = math.gcd(*routed)
        fix = f"pick an EP that divides {common}" if common > 1 else "no EP above 1 divides them all"
        raise MoecError(f"--ep {o.ep} does not divide the {' and '.join(map(str, routed))} routed experts of a "
                        f"layer{times}; {fix}")


def check_file(flag: str, path: str | None) -> None:
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise MoecError(f"{flag} {path}: no such file")
    if not p.is_file():
        raise MoecError(f"{flag} {path}: is not a file")
    if flag == "--calibration-data" and p.suffix == ".bin" and p.stat().st_size % 2:
        raise MoecError(f"{flag} {path}: {p.stat().st_size} bytes is not a whole number of uint16 token ids")


def read_weights(path: str) -> dict:
    """The dense state dict in --weights: safetensors, or a torch.save file loaded with weights_only (its
    tensors memory-mapped, so a large file costs nothing until they are copied into the model)."""
    check_file("--weights", path)
    path = str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        if path.endswith(".safetensors") or head[8:9] == b"{":  # an 8-byte header length, then JSON
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK"))
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            found = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
            why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            what = (f"it pickles {found.group(1)}, which only an unsafe load would run" if found else
                    f"torch.load(weights_only=True) refuses it ({why.group(1).strip() if why else 'unpickling'})")
            raise MoecError(f"--weights {path}: not a safe weights file: {what}; {FORMATS}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MoecError(f"--weights {path}: cannot read it ({type(e).__name__}: {first}); {FORMATS}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise MoecError(f"--weights {path}: holds a {type(state).__name__}, not a state dict; {FORMATS}")
    odd = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise MoecError(f"--weights {path}: {odd!r} is not a tensor but {type(state[odd]).__name__}; {FORMATS}")
    return state
