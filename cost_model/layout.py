"""Where each parallel group's ranks sit, and what its collectives cost there.

Rank order, fastest-varying first: TP, EP, DP, PP (rank = tp + TP*(ep +
EP*(dp + DP*pp))), so tensor-parallel groups stay inside a node and expert
groups are the next tightest.
"""
import functools

from moec.cost_model import topology
from moec.cost_model.hardware import Hardware


def groups(gpus: int, stride: int, size: int) -> list[list[int]]:
    """The groups of `size` ranks `stride` apart that tile range(gpus)."""
    return [[inner + stride * (i + size * outer) for i in range(size)]
            for outer in range(gpus // (stride * size)) for inner in range(stride)]


class Layout:
    def __init__(self, hw: Hardware, gpus: int, picks: int, max_nodes: int):
        self.cluster = topology.Cluster(hw, gpus)
        self.gpus, self.picks, self.max_nodes = gpus, picks, max_nodes

    @functools.lru_cache(maxsize=None)
    def a2a(self, tp: int, ep: int):
        return topology.all_to_all(self.cluster, groups(self.gpus, tp, ep), self.picks, self.max_nodes)

    @functools.lru_cache(maxsize=None)
    def all_reduce(self, stride: int, size: int):
        return topology.all_reduce(self.cluster, groups(self.gpus, stride, size))

    @functools.lru_cache(maxsize=None)
    def pp(self, stride: int, size: int):
        pairs = [(g[i], g[i + 1]) for g in groups(self.gpus, stride, size) for i in range(size - 1)]
        return topology.send_recv(self.cluster, pairs)

    def costs(self, ep: int, dp: int, tp: int, pp: int) -> dict:
        """CollectiveCost per collective name of time_model."""
        return {
            "a2a": self.a2a(tp, ep),
            "grad_dense": self.all_reduce(tp, ep * dp),
            "grad_experts": self.all_reduce(tp * ep, dp),
            "tp": self.all_reduce(1, tp),
            "pp": self.pp(tp * ep * dp, pp),
        }
