"""The process groups the moec:: collectives run on, by name.

The compiled graph names groups ("ep", "ep_intra", "ep_inter", "data"), never
holds them: the same graph runs on every rank, and `moec.runtime.distributed.setup`
registers the groups of this rank's mesh before the first step. A name with
no group registered runs as a group of one (a single process: the
collectives are identities), so an EP build also runs on one CPU.
"""
import torch.distributed as dist

from moec.base.errors import MoecError

_GROUPS: dict = {}


def register(name: str, group) -> None:
    _GROUPS[name] = group


def clear() -> None:
    _GROUPS.clear()


def get(name: str):
    """The group registered under name, or None (a group of one)."""
    return _GROUPS.get(name)


def size(name: str) -> int:
    g = _GROUPS.get(name)
    return 1 if g is None else dist.get_world_size(g)


def check_ep(name: str, ep_size: int) -> int:
    """The running group size, which must be the one the graph was compiled for (or one)."""
    n = size(name)
    if n not in (1, ep_size):
        raise MoecError(f"this build was compiled for EP={ep_size} but runs with an '{name}' group of {n} ranks; "
                        f"call moec.runtime.distributed.setup with the build's config, or recompile with --ep {n}")
    return n
