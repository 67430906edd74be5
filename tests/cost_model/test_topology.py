"""Collective costs read off the cluster graph."""
import pytest

from moec.cost_model.hardware import GB, builtin_names, cluster_graph, load_hardware
from moec.cost_model.layout import groups
from moec.cost_model.topology import Cluster, all_reduce, all_to_all, send_recv


def test_graph_has_datasheet_links():
    frontier = cluster_graph(load_hardware("frontier"), 2)
    assert frontier.edges[("gpu", 0, 0), ("gpu", 0, 1)]["bw"] == 200 * GB  # GCDs of one MI250X
    assert frontier.edges[("nic", 1, 3), ("fabric",)]["bw"] == 25 * GB
    assert sum(1 for v in frontier if v[0] == "nic") == 8
    dgx = cluster_graph(load_hardware("dgx_h100"), 1)
    assert dgx.edges[("gpu", 0, 5), ("switch", 0)]["bw"] == 450 * GB


def test_all_to_all_inside_nvswitch_runs_at_link_speed():
    c = Cluster(load_hardware("dgx_h100"), 8)
    cost = all_to_all(c, groups(8, 1, 8), picks=2)
    assert cost.algorithm == "flat"
    assert cost.bandwidth == pytest.approx(450 * GB)


def test_cross_node_all_to_all_is_bound_by_nics():
    hw = load_hardware("dgx_h100")
    c = Cluster(hw, 16)
    flat_only = all_to_all(c, groups(16, 1, 16), picks=1)  # one pick: nothing to de-duplicate
    # 8 of 15 peers sit behind the 50 GB/s NIC: volume/time = 50 GB/s * 15/8
    assert flat_only.bandwidth == pytest.approx(50 * GB * 15 / 8, rel=1e-6)
    assert flat_only.bottleneck == "nic0->fabric"


def test_frontier_gcds_share_a_nic():
    """Four NICs for eight GCDs: half the per-GPU injection bandwidth of a DGX's, at half the NIC speed."""
    dgx = all_to_all(Cluster(load_hardware("dgx_h100"), 64), groups(64, 1, 64), picks=1)
    frontier = all_to_all(Cluster(load_hardware("frontier"), 64), groups(64, 1, 64), picks=1)
    assert frontier.bandwidth == pytest.approx(dgx.bandwidth / 4, rel=0.05)


def test_hierarchical_and_node_limited_all_to_all():
    c = Cluster(load_hardware("dgx_h100"), 64)
    flat_like = all_to_all(c, groups(64, 1, 64), picks=1)
    many = all_to_all(c, groups(64, 1, 64), picks=8)
    limited = all_to_all(c, groups(64, 1, 64), picks=8, max_nodes=2)
    assert many.algorithm == "hierarchical"
    assert many.bandwidth > flat_like.bandwidth  # per-node de-duplication saves NIC bytes
    assert limited.bandwidth > many.bandwidth


def test_all_reduce_two_level_beats_flat_ring_across_nodes():
    c = Cluster(load_hardware("dgx_h100"), 32)
    cost = all_reduce(c, groups(32, 1, 32))
    assert cost.algorithm == "two-level"
    assert cost.bandwidth > 50 * GB
    inside = all_reduce(Cluster(load_hardware("dgx_h100"), 8), groups(8, 1, 8))
    assert (inside.algorithm, inside.bandwidth) == ("ring", pytest.approx(450 * GB))
    assert all_reduce(c, groups(32, 1, 1)).algorithm == "none"


def test_pipeline_sends_between_nodes():
    c = Cluster(load_hardware("mi300x"), 16)
    cost = send_recv(c, [(r, r + 8) for r in range(8)])
    assert cost.bandwidth == pytest.approx(50 * GB)
    assert cost.alpha == load_hardware("mi300x").latency_inter


def test_groups_tile_ranks():
    gs = groups(16, 2, 4)
    assert sorted(r for g in gs for r in g) == list(range(16))
    assert gs[0] == [0, 2, 4, 6] and gs[1] == [1, 3, 5, 7]


def test_every_builtin_profile_cites_its_figures():
    assert builtin_names() == ["dgx_h100", "dgx_h200", "frontier", "mi300x"]
    for name in builtin_names():
        hw = load_hardware(name)
        cited = set(hw.raw["sources"])
        assert {"peak_tflops_bf16", "gemm_efficiency", "gemm_half_rows", "memory_gib", "nics", "latency_us",
                "grad_overlap"} <= cited, name
        assert cited & {"links", "switch_GBps"}, name
        assert hw.gpus_per_node == 8
