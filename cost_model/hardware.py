"""Hardware profiles: one JSON file per machine under hardware/, or any JSON
file of the same form (what `moec calibrate` writes).

A profile gives the GPU (peak bf16 TFLOP/s, the share of it a large GEMM
reaches, memory and the bandwidth a copy reaches) and one node's interconnect: GPU-GPU links, an optional
switch (NVSwitch), NICs and the GPUs they hang off, all in GB/s per direction.
`cluster_graph` turns that into a networkx DiGraph of n nodes joined by a
non-blocking network fabric; the collective costs are read off that graph.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from moec.base.errors import MoecError

HARDWARE_DIR = Path(__file__).parent / "hardware"
GB = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    gpu_name: str
    peak_flops: float  # bf16 dense, per GPU
    gemm_efficiency: float
    gemm_half_rows: float
    memory_bytes: float  # usable per GPU
    memory_bandwidth: float  # bytes/s a copy moves (read + write)
    elementwise_passes: float  # memory-bound passes over the saved activations per step (time_model.kappa)
    gpus_per_node: int
    links: tuple  # (gpu, gpu, GB/s)
    switch_gbps: float  # per GPU into the switch; 0 without one
    nics: tuple  # ((gpus...), GB/s, attach GB/s)
    latency_intra: float  # seconds per message
    latency_inter: float
    grad_overlap: float  # share of backward compute a gradient reduction can hide under
    raw: dict

    @classmethod
    def from_dict(cls, d: dict) -> "Hardware":
        try:
            gpu, node, lat = d["gpu"], d["node"], d["latency_us"]
            return cls(
                name=d["name"], gpu_name=gpu["name"], peak_flops=gpu["peak_tflops_bf16"] * 1e12,
                gemm_efficiency=gpu["gemm_efficiency"], gemm_half_rows=gpu["gemm_half_rows"],
                memory_bytes=gpu["memory_gib"] * 2**30 * gpu["usable_memory_fraction"],
                memory_bandwidth=gpu["memory_GBps"] * GB, elementwise_passes=gpu["elementwise_passes"],
                gpus_per_node=node["gpus"], links=tuple(tuple(x) for x in node.get("links", [])),
                switch_gbps=node.get("switch_GBps", 0),
                nics=tuple((tuple(n["gpus"]), n["GBps"], n["attach_GBps"]) for n in node["nics"]),
                latency_intra=lat["intra"] * 1e-6, latency_inter=lat["inter"] * 1e-6,
                grad_overlap=d["grad_overlap"], raw=d)
        except KeyError as e:
            raise MoecError(f"hardware profile {d.get('name', '?')} lacks the field {e}; "
                            "compare it with a built-in profile under cost_model/hardware/") from None


def builtin_names() -> list[str]:
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.json"))


def load_hardware(name_or_path: str) -> Hardware:
    """A built-in profile by name (frontier, mi300x, dgx_h100, dgx_h200) or a JSON file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = HARDWARE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise MoecError(f"no hardware profile {name_or_path!r}; use one of {', '.join(builtin_names())} "
                        "or the path of a JSON profile (moec calibrate writes one)")
    return Hardware.from_dict(json.loads(path.read_text()))


def cluster_graph(hw: Hardware, nodes: int) -> nx.DiGraph:
    """GPUs ("gpu", n, i), NICs ("nic", n, j), switches ("switch", n) and one
    ("fabric",); each directed edge has bw (bytes/s), level ("intra" inside a
    node, "inter" through a NIC) and cost (1/bw, for routing)."""
    g = nx.DiGraph()

    def link(u, v, gbps, level):
        for a, b in ((u, v), (v, u)):
            g.add_edge(a, b, bw=gbps * GB, level=level, cost=1 / gbps)

    for n in range(nodes):
        for i in range(hw.gpus_per_node):
            g.add_node(("gpu", n, i))
            if hw.switch_gbps:
                link(("gpu", n, i), ("switch", n), hw.switch_gbps, "intra")
        for a, b, gbps in hw.links:
            link(("gpu", n, a), ("gpu", n, b), gbps, "intra")
        for j, (gpus, gbps, attach) in enumerate(hw.nics):
            for i in gpus:
                link(("gpu", n, i), ("nic", n, j), attach, "inter")
            link(("nic", n, j), ("fabric",), gbps, "inter")
    return g
