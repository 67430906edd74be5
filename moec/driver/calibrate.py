"""`moec calibrate`: measure this machine and write a hardware profile.

GEMM throughput over row counts (the best rate, and m_half, the rows at which
half of it is reached), the bandwidth of a large copy, and all-reduce /
all-to-all times over message sizes across `procs` processes (gloo on CPU,
NCCL/RCCL on GPUs), fitted to t = alpha + volume / beta with volume counted as
comm.py counts it. With --base the profile keeps that machine's topology and
takes the measured GEMM, copy and latency figures (a single device times no
collectives and keeps the base's latencies); without, it describes one node of
`procs` devices joined by a switch of the measured all-to-all bandwidth, with
no NICs.
"""
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import click
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moec.base.errors import MoecError
from moec.cost_model.hardware import Hardware, load_hardware


def _median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_gemm(device: torch.device, dim: int, rows=(32, 128, 512, 2048), reps: int = 5) -> dict:
    """TFLOP/s of [m, dim] x [dim, dim] per row count m; fitted peak and m_half."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    w = torch.randn(dim, dim, device=device, dtype=dtype)
    rate = {}
    for m in rows:
        x = torch.randn(m, dim, device=device, dtype=dtype)
        t = _median_time(lambda: (x @ w, _sync(device)), reps)
        rate[m] = 2 * m * dim * dim / t
    # rate(m) = peak * m / (m + m_half): each row count gives an estimate of m_half
    peak = max(rate.values())
    halves = sorted(m * (peak / rate[m] - 1) for m in rows)
    return {"tflops": peak / 1e12, "half_rows": halves[len(halves) // 2],
            "by_rows": {str(m): r / 1e12 for m, r in rate.items()}}


def measure_copy_bandwidth(device: torch.device, reps: int = 10) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB of fp32 on a GPU, 64 MiB on a CPU
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    seconds = _median_time(lambda: (dst.copy_(src), _sync(device)), reps)
    return 2 * n * 4 / seconds


def _fit(xs, ys) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def _collective_worker(rank: int, world: int, port: int, sizes: list, backend: str, result: str, reps: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    out = {"all_reduce": {}, "all_to_all": {}}
    for size in sizes:
        n = max(size // 4 // world * world, world)
        x, y = torch.randn(n, device=device), torch.empty(n, device=device)
        out["all_reduce"][size] = _median_time(lambda: (dist.all_reduce(x), _sync(device)), reps)
        out["all_to_all"][size] = _median_time(lambda: (dist.all_to_all_single(y, x), _sync(device)), reps)
        dist.barrier()
    if rank == 0:
        Path(result).write_text(json.dumps(out))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_collectives(procs: int, sizes: list, reps: int = 5) -> dict:
    """alpha (s) and beta (bytes/s) of all-reduce and all-to-all across procs processes."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "times.json")
        mp.spawn(_collective_worker, args=(procs, _free_port(), sizes, backend, result, reps), nprocs=procs)
        times = json.loads(Path(result).read_text())
    fits = {}
    for name, passes in (("all_reduce", 2), ("all_to_all", 1)):
        vols = [passes * (procs - 1) / procs * int(s) for s in times[name]]
        secs = list(times[name].values())
        slope, icpt = _fit(vols, secs)
        if slope <= 0 or icpt < 0:  # noise swamped the size dependence: charge all time to bandwidth
            slope, icpt = max(s / v for s, v in zip(secs, vols)), 0.0
        fits[name] = {"alpha_us": icpt * 1e6, "GBps": 1 / slope / 1e9, "seconds_by_bytes": times[name]}
    return fits


def _memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def calibrate_profile(out, base=None, sizes=(4096, 65536), procs: int = 0, gemm_dim: int = 0) -> dict:
    """Measure, write the profile JSON to `out`, return it."""
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    procs = procs or (torch.cuda.device_count() if gpu else 2)
    if gpu and procs > torch.cuda.device_count():
        raise MoecError(f"--procs {procs} is more than the {torch.cuda.device_count()} GPU(s) here: the collectives "
                        f"run one process per GPU")
    gemm = measure_gemm(device, gemm_dim or (4096 if gpu else 512))
    copy_bw = measure_copy_bandwidth(device)
    # one device has no collective to time: the base profile's (or a nominal) network stays
    coll = measure_collectives(procs, list(sizes)) if procs > 1 else None
    if coll is None and not base:
        raise MoecError("calibrating a single device measures no collectives: pass --base NAME to keep that "
                        "profile's network, or run with --procs 2 or more")
    name = torch.cuda.get_device_name(0) if gpu else "CPU"
    if base:
        hw: Hardware = load_hardware(base)
        profile = json.loads(json.dumps(hw.raw))
        profile["gpu"]["gemm_efficiency"] = min(gemm["tflops"] * 1e12 / hw.peak_flops, 1.0)
    else:
        profile = {
            "description": f"measured by moec calibrate: one node of {procs} x {name}",
            "gpu": {"name": name, "peak_tflops_bf16": gemm["tflops"], "gemm_efficiency": 1.0,
                    "memory_gib": _memory_gib(), "usable_memory_fraction": 0.9, "elementwise_passes": 4},
            "node": {"gpus": procs, "switch_GBps": coll["all_to_all"]["GBps"], "nics": []},
            "grad_overlap": 0.8,
            "sources": {"grad_overlap": "not measured: the built-in profiles' estimate",
                        "elementwise_passes": "not measured: the floor of 4 passes over the saved activations"},
        }
    profile["name"] = f"{hw.name}-calibrated" if base else f"calibrated-{name.replace(' ', '_')}"
    profile["gpu"]["gemm_half_rows"] = gemm["half_rows"]
    profile["gpu"]["memory_GBps"] = copy_bw / 1e9
    profile["measured"] = {"gemm_tflops": gemm["tflops"], "gemm_half_rows": gemm["half_rows"],
                           "gemm_tflops_by_rows": gemm["by_rows"], "copy_GBps": copy_bw / 1e9, "processes": procs,
                           "device": name}
    if coll is not None:
        alpha = coll["all_to_all"]["alpha_us"]
        profile["latency_us"] = {"intra": alpha, "inter": profile.get("latency_us", {}).get("inter", alpha)}
        profile["measured"].update(all_reduce=coll["all_reduce"], all_to_all=coll["all_to_all"])
    profile.setdefault("sources", {})["measured"] = "moec calibrate on this machine"
    Path(out).write_text(json.dumps(profile, indent=1) + "\n")
    return profile


@click.command("calibrate")
@click.option("-o", "--out", type=click.Path(dir_okay=False), default="hardware-profile.json", show_default=True)
@click.option("--base", default=None, help="built-in profile whose topology the measurements refine")
@click.option("--sizes", default="4096,65536,1048576,16777216", show_default=True,
              help="message sizes in bytes, comma separated")
@click.option("--procs", type=int, default=0, help="processes for the collectives (default: GPUs, or 2 on CPU)")
@click.option("--gemm-dim", type=int, default=0, help="K = N of the timed GEMMs (default: 4096 GPU, 512 CPU)")
def calibrate(out, base, sizes, procs, gemm_dim):
    """Measure GEMM throughput and collective times here; write a profile --hardware accepts."""
    sizes_ = [int(x) for x in sizes.split(",") if x]
    profile = calibrate_profile(out, base=base, sizes=sizes_, procs=procs, gemm_dim=gemm_dim)
    m = profile["measured"]
    click.echo(f"GEMM {m['gemm_tflops']:.3g} TFLOP/s, m_half {m['gemm_half_rows']:.0f} rows; "
               f"copy {m['copy_GBps']:.4g} GB/s")
    if "all_reduce" in m:
        click.echo(f"all-reduce alpha {m['all_reduce']['alpha_us']:.1f} us beta {m['all_reduce']['GBps']:.3g} GB/s; "
                   f"all-to-all alpha {m['all_to_all']['alpha_us']:.1f} us beta {m['all_to_all']['GBps']:.3g} GB/s")
    click.echo(f"wrote {out}")
