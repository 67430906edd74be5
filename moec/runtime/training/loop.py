"""The pieces of train.py's loop that are not the recipe itself: process
setup under torchrun (and naming the ranks a timed-out collective lost),
signals, RNG state and the final export of the weights. The parallel plan is
applied by moec.runtime.training.parallel."""
import atexit
import datetime
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moec.base.errors import MoecError
from moec.runtime.distributed.trace import CollectiveTrace


_watch = None  # (side gloo group, timeout_s) while a process group is up: what run_main names lost ranks with
_trace = None  # (CollectiveTrace, the file teardown writes it to) under --debug-collectives


@dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device


def setup_distributed(seed: int, device: str = "auto", timeout_s: float = 600.0, trace: Path | None = None) -> Env:
    """One process: CPU or the first GPU. Under torchrun (WORLD_SIZE > 1): a process group,
    NCCL on GPUs (RCCL on ROCm builds answers to the same name), gloo on CPUs. device: "auto" (a GPU
    when there is one), "cuda" or "cpu". timeout_s: how long a collective waits for the other ranks
    before the run stops (run_main then names the ranks that did not arrive). trace: a folder where teardown
    writes the collectives each rank issued, rank<N>.json (moec.runtime.distributed.trace)."""
    global _watch, _trace
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda and local >= torch.cuda.device_count():
        raise MoecError(f"rank {rank} has local rank {local}, but this node has {torch.cuda.device_count()} "
                        f"GPU(s): start at most that many processes per node, or pass --device cpu")
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world > 1:
        timeout = datetime.timedelta(seconds=timeout_s)
        # Subgroups (the DeviceMesh dims of EP and FSDP runs) take torch's default timeout, 30 min on gloo,
        # not the default group's, and init_device_mesh takes none: make ours the default.
        c10d = dist.distributed_c10d
        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None, timeout=timeout)
        if trace is not None:
            _trace = (CollectiveTrace().__enter__(), trace / f"rank{rank}.json")
        # A group of its own for naming the missing ranks after a timeout: the timed-out group's
        # connections are closed by then ("Application timeout caused pair closure").
        _watch = (dist.new_group(backend="gloo", timeout=timeout), timeout_s)
    torch.manual_seed(seed)
    return Env(rank, world, local, device)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def teardown() -> None:
    global _watch, _trace
    _watch = None
    if _trace is not None:
        _trace[0].__exit__()
        _trace[0].write(_trace[1])
        _trace = None
    if dist.is_initialized():
        dist.destroy_process_group()


# What gloo raises (a RuntimeError naming no rank) when a peer does not answer in time, "[.../gloo/transport/
# tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete" (later ops on that
# group: "Application timeout caused pair closure"), and when a peer is gone. NCCL's watchdog ends the
# process itself on a timeout; only with TORCH_NCCL_BLOCKING_WAIT=1 does Python see its error.
_TIMED_OUT = re.compile(r"Timed out waiting|Application timeout caused pair closure|collective operation timeout")
_CLOSED = re.compile(r"Connection (closed|reset) by peer")


def run_main(main, args) -> int:
    """Run train.py's main; a user's mistake (bad --data, ...) prints one line and exits 2.
    A collective that timed out, or lost a rank, prints one line naming the missing ranks and exits 1.
    The process ends here, with main's exit status, once the atexit functions have run: the interpreter's
    own exit would add about a second a process, its last garbage collection walking every object torch
    made."""
    try:
        code = main(args)
    except MoecError as e:
        _error_line(str(e))
        teardown()
        code = 2
    except Exception as e:
        _lost_rank(e)
        raise  # every rank answered: a bug (say, ranks calling different collectives), not a lost rank
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _error_line(message: str) -> None:
    """One write, newline included: the ranks share torchrun's stderr, and print's separate write of the
    newline (stderr unbuffered) lets another rank's line in between."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def _lost_rank(e: Exception) -> None:
    """When e is a collective's timeout or a lost connection and some ranks do not answer: one line naming
    them, and the process ends with status 1."""
    timed_out = bool(_TIMED_OUT.search(str(e)))
    missing = _missing_ranks(*_watch) if _watch and (timed_out or _CLOSED.search(str(e))) else []
    if not missing:
        return
    me, timeout_s = dist.get_rank(), _watch[1]
    who = f"rank{'s' * (len(missing) > 1)} {', '.join(map(str, missing))}"
    what = (f"waited {timeout_s:g} s for {who}, which did not arrive (stopped, hung or dead)" if timed_out
            else f"lost its connection to {who} (dead or killed)")
    _error_line(f"rank {me}: a collective {what}; the run is stopped — resume it with --resume")
    sys.stdout.flush()
    os._exit(1)  # no teardown, no interpreter exit: destroying a group whose peer is gone can block


def _missing_ranks(group, timeout_s: float) -> list[int]:
    """The ranks that do not answer on `group` within the timeout (at most a minute: the survivors timed out on
    the same collective, so they arrive here close together). Each rank messages every other and listens
    to each, so every survivor names the same ranks; monitored_barrier would tell rank 0 only."""
    me, world = dist.get_rank(), dist.get_world_size()
    talks, missing = {}, []
    for r in range(world):
        if r != me:
            try:  # a dead rank's closed connection fails here, at once
                talks[r] = dist.isend(torch.zeros(1), r, group=group), dist.irecv(torch.zeros(1), r, group=group)
            except RuntimeError:
                missing.append(r)
    deadline = time.monotonic() + min(timeout_s, 60.0)
    for r, (_, heard) in talks.items():  # the sends stay referenced: dropped, some went unsent (seen on gloo)
        try:
            heard.wait(datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.01)))
        except RuntimeError:
            missing.append(r)
    return sorted(missing)


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    # on the side gloo group, a CPU tensor: a GPU's would make every step wait for the GPU's queue
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_watch[0])
    return bool(t.item())


class StopOnSignal:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the step in flight.
    Ranks agree on it (one all-reduce a step, on the host) so all of them save the same step."""

    def __init__(self):
        self.signum, self._old = None, {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def requested(self) -> bool:
        stop = _any_rank(self.signum is not None)
        if stop and self.signum is None:
            self.signum = signal.SIGTERM  # another rank was signalled
        return stop

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def export_weights(model: torch.nn.Module, path, env: Env) -> None:
    """The full weights under the build's parameter names, each tied parameter once:
    the file `moec.runtime.load_weights` and `moec compile --weights` read."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.rank != 0:
        return
    seen, keep = set(), []
    for name, p in unwrap(model).named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            keep.append(name)
    keep += [n for n in state if n not in dict(unwrap(model).named_parameters(remove_duplicate=False))]
    save_file({n: state[n].detach().contiguous() for n in keep if n in state}, str(path))
