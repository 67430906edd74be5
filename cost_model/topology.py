"""Collective costs read off the cluster graph.

A collective is a traffic matrix (bytes from GPU to GPU); each message takes
the cheapest route in the graph (networkx shortest path, cost 1/bandwidth), and
its bytes load every directed link on the way. The beta term is the busiest
link's load over its bandwidth, so a NIC shared by two GCDs, a node whose
traffic funnels through four NICs, or an all-to-all that stays inside NVSwitch
all come out of the same rule. Algorithms that move traffic differently
(hierarchical all-to-all with per-node de-duplication, node-limited routing,
two-level all-reduce) are different traffic matrices, costed the same way.

Nodes are alike and the layout is periodic, so only messages that start or
end on node 0 are routed: node 0's links carry what every node's links carry.
Global rank r is GPU r % gpus_per_node of node r // gpus_per_node.
"""
import functools
from dataclasses import dataclass

import networkx as nx

from moec.base.errors import MoecError
from moec.cost_model.hardware import Hardware, cluster_graph


@dataclass(frozen=True)
class CollectiveCost:
    """time(volume, calls) = calls * alpha + volume / bandwidth, volume in
    bytes per GPU as comm.py counts it."""
    algorithm: str
    alpha: float
    bandwidth: float
    bottleneck: str


class Cluster:
    def __init__(self, hw: Hardware, gpus: int):
        self.hw, self.gpus = hw, gpus
        self.gpn = hw.gpus_per_node
        self.nodes = -(-gpus // self.gpn)
        if self.nodes > 1 and not hw.nics:
            raise MoecError(f"hardware profile {hw.name} has no NICs, so it covers one node of {self.gpn} GPUs, "
                            f"not {gpus}; plan for at most {self.gpn} GPUs or use a profile with NICs")
        self.graph = cluster_graph(hw, min(self.nodes, 2))

    def node(self, r: int) -> int:
        return r // self.gpn

    @functools.lru_cache(maxsize=None)
    def _template(self, a: int, b: int, cross: bool) -> tuple:
        dst = ("gpu", 1 if cross else 0, b)
        path = nx.shortest_path(self.graph, ("gpu", 0, a), dst, weight="cost")
        return tuple(zip(path, path[1:]))

    def route(self, src: int, dst: int) -> list:
        """Directed edges from rank src to rank dst, node ids made real."""
        ns, nd = self.node(src), self.node(dst)
        relabel = lambda v: v if v[0] == "fabric" else (v[0], ns if v[1] == 0 else nd, *v[2:])
        return [(relabel(u), relabel(v)) for u, v in self._template(src % self.gpn, dst % self.gpn, ns != nd)]

    def transfer_time(self, traffic: dict) -> tuple[float, str]:
        """Seconds for {(src, dst): bytes} sent at once, and the busiest link."""
        load: dict = {}
        for (s, d), nbytes in traffic.items():
            if s == d or not nbytes or (self.node(s) and self.node(d)):
                continue
            for e in self.route(s, d):
                if _on_node0(e):  # only node 0 sees all of its traffic here
                    load[e] = load.get(e, 0.0) + nbytes
        if not load:
            return 0.0, "none"
        edge = max(load, key=lambda e: load[e] / self.graph.edges[e]["bw"])
        return load[edge] / self.graph.edges[edge]["bw"], _edge_name(edge)

    def latency(self, ranks) -> float:
        return self.hw.latency_inter if len({self.node(r) for r in ranks}) > 1 else self.hw.latency_intra


def _on_node0(edge) -> bool:
    return any(v[0] != "fabric" and v[1] == 0 for v in edge)


def _edge_name(edge) -> str:
    name = lambda v: "fabric" if v[0] == "fabric" else f"{v[0]}{v[2] if len(v) > 2 else ''}"
    return f"{name(edge[0])}->{name(edge[1])}"


def _node0_groups(cluster: Cluster, groups: list[list[int]]) -> list[list[int]]:
    return [g for g in groups if any(cluster.node(r) == 0 for r in g)]


def _by_node(cluster: Cluster, group: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for r in group:
        out.setdefault(cluster.node(r), []).append(r)
    return out


def all_to_all(cluster: Cluster, groups: list[list[int]], picks: float, max_nodes: int = 0) -> CollectiveCost:
    """Dispatch (or combine) of tokens that each pick `picks` experts spread
    evenly over the group. Flat: one copy per pick, straight to its rank.
    Hierarchical: one copy per destination node (at most max_nodes of them
    when routing is node-limited) to the same-index GPU there, which fans it
    out inside the node. The cheaper one is chosen."""
    groups = _node0_groups(cluster, groups)
    n = len(groups[0])
    per_peer = 1.0 / n * picks  # a token of 1 byte sends picks/n copies to each rank
    volume = per_peer * (n - 1)
    flat = {(s, d): per_peer for g in groups for s in g for d in g}
    t_flat, neck = cluster.transfer_time(flat)
    nodes = _by_node(cluster, groups[0])
    alpha = cluster.latency(groups[0]) * (n - 1)
    best = CollectiveCost("flat", alpha, volume / t_flat if t_flat else float("inf"), neck)
    nn = len(nodes)
    if nn == 1:
        return best
    hits = nn * (1 - (1 - 1 / nn) ** picks)
    if max_nodes:
        hits = min(hits, max_nodes)
    inter, intra = {}, {}
    for g in groups:
        by_node = _by_node(cluster, g)
        for s in g:
            li = by_node[cluster.node(s)].index(s)
            for local in by_node.values():
                d = local[li % len(local)]
                inter[(s, d)] = hits / nn
                for peer in local:  # every node-held token fans out to the local experts
                    intra[(d, peer)] = picks / len(local)
    t_inter, neck_inter = cluster.transfer_time(inter)
    t_intra, neck_intra = cluster.transfer_time(intra)
    t = t_inter + t_intra
    if t < t_flat:
        per_node = max(len(v) for v in nodes.values())
        alpha = cluster.hw.latency_inter * (nn - 1) + cluster.hw.latency_intra * (per_node - 1)
        neck = neck_inter if t_inter >= t_intra else neck_intra
        best = CollectiveCost("hierarchical", alpha, volume / t, neck)
    return best


def all_reduce(cluster: Cluster, groups: list[list[int]], passes: int = 2) -> CollectiveCost:
    """Ring all-reduce (passes=2: reduce-scatter + all-gather; 1 for either
    alone) over each group, flat or two-level (ring inside each node, then a
    ring across nodes among same-index GPUs on 1/g of the data)."""
    groups = _node0_groups(cluster, groups)
    n = len(groups[0])
    if n == 1:
        return CollectiveCost("none", 0.0, float("inf"), "none")
    volume = passes * (n - 1) / n
    ring = {(g[i], g[(i + 1) % n]): 1.0 / n for g in groups for i in range(n)}
    t_step, neck = cluster.transfer_time(ring)
    steps = passes * (n - 1)
    best = CollectiveCost("ring", cluster.latency(groups[0]) * steps, volume / (t_step * steps), neck)
    nodes = list(_by_node(cluster, groups[0]).values())
    g, nn = len(nodes[0]), len(nodes)
    if nn == 1 or g == 1 or any(len(x) != g for x in nodes):
        return best
    intra, inter = {}, {}
    for grp in groups:
        local = list(_by_node(cluster, grp).values())
        for ranks in local:
            for i in range(g):
                intra[(ranks[i], ranks[(i + 1) % g])] = 1.0 / g
        for i in range(g):
            for j in range(nn):
                inter[(local[j][i], local[(j + 1) % nn][i])] = 1.0 / (g * nn)
    t_intra, neck_intra = cluster.transfer_time(intra)
    t_inter, neck_inter = cluster.transfer_time(inter)
    t = passes * ((g - 1) * t_intra + (nn - 1) * t_inter)
    if t < t_step * steps:
        alpha = passes * ((g - 1) * cluster.hw.latency_intra + (nn - 1) * cluster.hw.latency_inter)
        best = CollectiveCost("two-level", alpha, volume / t, neck_inter if t_inter * (nn - 1) > t_intra * (g - 1)
                              else neck_intra)
    return best


def send_recv(cluster: Cluster, pairs: list[tuple[int, int]]) -> CollectiveCost:
    """Point-to-point sends, all at once (pipeline stage boundaries)."""
    pairs = [(s, d) for s, d in pairs if cluster.node(s) == 0 or cluster.node(d) == 0]
    if not pairs:
        return CollectiveCost("none", 0.0, float("inf"), "none")
    t, neck = cluster.transfer_time({p: 1.0 for p in pairs})
    return CollectiveCost("p2p", cluster.latency(pairs[0]), 1.0 / t, neck)
