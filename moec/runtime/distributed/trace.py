"""A record of the collectives and point-to-point transfers this rank issues, in issue order: ranks that
share a group must issue the same collectives on it, and every send needs its receive, or a run hangs.
train.py's --debug-collectives writes it; tests compare the ranks' records (agreement below). Ranks are
compared group by group: the stages of a pipeline run different layers, so their EP and data groups' sequences
differ, while the members of each group (and all ranks, on the world's) issue one sequence.

Collectives are recorded as [op, group name, elements] (elements: what the ranks must agree on, where the
op fixes it; None for all-to-all, whose splits differ by rank), transfers as [send or recv, peer's global
rank, elements]. The patches are of torch.distributed's functions as the callers look them up: the
collectives by the package's names, the transfers also by distributed_c10d's, which P2POp and
batch_isend_irecv use (the pipeline schedules send through them)."""
import inspect
import json
from pathlib import Path

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

ELEMENTS = {"all_reduce": 0, "all_gather_into_tensor": 1, "all_gather_single": 1, "reduce_scatter_tensor": 1,
            "broadcast": 0}
COLLECTIVES = (*(name for name in ELEMENTS if hasattr(dist, name)), "all_to_all_single", "all_gather_object", "broadcast_object_list", "gather_object",
               "scatter_object_list", "barrier", "monitored_barrier")
TRANSFERS = {"isend": "send", "send": "send", "irecv": "recv", "recv": "recv"}


class CollectiveTrace:
    """While entered, torch.distributed's collectives and transfers are recorded here as they are issued."""

    def __init__(self):
        self.collectives, self.transfers, self.groups, self._saved = [], [], {}, []

    def __enter__(self):
        for name in COLLECTIVES:
            self._patch(dist, name, self._collective(name, getattr(dist, name)))
        for name, kind in TRANSFERS.items():
            wrapper = self._transfer(kind, getattr(c10d, name))
            self._patch(c10d, name, wrapper)
            self._patch(dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        for module, name, f in reversed(self._saved):
            setattr(module, name, f)
        self._saved.clear()

    def _patch(self, module, name, wrapper):
        self._saved.append((module, name, getattr(module, name)))
        setattr(module, name, wrapper)

    def _group(self, group) -> str:
        group = group or dist.group.WORLD
        name = group.group_name  # the same on every rank: groups are made in the same order everywhere
        if name not in self.groups:
            self.groups[name] = dist.get_process_group_ranks(group)
        return name

    def _collective(self, name, f):
        signature, at = inspect.signature(f), ELEMENTS.get(name)

        def call(*args, **kw):
            given = signature.bind(*args, **kw).arguments
            elements = None if at is None else given[list(signature.parameters)[at]].numel()
            self.collectives.append([name, self._group(given.get("group")), elements])
            return f(*args, **kw)
        return call

    def _transfer(self, kind, f):
        signature = inspect.signature(f)
        tensor_name, peer_name, _, _, local_name = signature.parameters  # tensor, dst/src, group, tag, group_dst/src

        def call(*args, **kw):
            given = signature.bind(*args, **kw).arguments
            peer, group = given.get(peer_name), given.get("group")
            if peer is None and given.get(local_name) is not None:
                peer = dist.get_global_rank(group or dist.group.WORLD, given[local_name])
            self.transfers.append([kind, peer, given[tensor_name].numel()])
            return f(*args, **kw)
        return call

    def record(self) -> dict:
        """{"groups": {name: its global ranks}, "collectives": [...], "transfers": [...]} (see above)."""
        return {"groups": self.groups, "collectives": self.collectives, "transfers": self.transfers}

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.record()))


def agreement(records: dict) -> list[str]:
    """records: {rank: a rank's record()} -> what disagrees: a group whose members issued
    different collectives on it, a pair of ranks whose sends and receives do not match; [] when none does."""
    problems = []
    groups = {name: ranks for r in records.values() for name, ranks in r["groups"].items()}
    for name, ranks in sorted(groups.items()):
        issued = {rank: [c for c in records[rank]["collectives"] if c[1] == name] for rank in ranks}
        if any(calls != issued[ranks[0]] for calls in issued.values()):
            problems.append(f"group {name} (ranks {ranks}): " +
                            "; ".join(f"rank {r} issued {len(c)}" for r, c in issued.items()))
    for a in records:
        for b in records:
            sent = [n for kind, peer, n in records[a]["transfers"] if kind == "send" and peer == b]
            received = [n for kind, peer, n in records[b]["transfers"] if kind == "recv" and peer == a]
            if sent != received:
                problems.append(f"rank {a} sent {len(sent)} transfers to rank {b}, which received {len(received)}")
    return problems
