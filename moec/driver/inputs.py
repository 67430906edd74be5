"""What `moec compile` is given, checked before the model is captured (seconds; a quarter minute for a
70B model): the build dir it may write and the files it reads (the dense weights: moec.driver.dense_weights)."""
import json
import math
from pathlib import Path

from moec.base.errors import MoecError
from moec.base.options import Options


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
