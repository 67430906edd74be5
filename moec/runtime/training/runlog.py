"""Everything train.py reports: the progress bar every step, a metrics line and
a metrics.jsonl record every --log-every steps, validation loss, and what the
run needs to know about its build (active parameters, MoE options, FLOPs).

Only the steps that log (and the last) read values back from the device: a
read waits for the GPU to finish the step, which then starts the next one
idle. The first record also tells how the step runs: --compile's graph breaks
(and under --cuda-graphs the graphs inductor would not capture), and on a GPU
the kernels one step launched, counted by torch.profiler over the first logged
step after the warm-up step."""
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moec.base.errors import MoecError
from moec.base.options import Options
from moec.runtime.training.metrics import (attention_flops_per_step, device_peak_flops, expert_load,
                                   load_summary, split_params, step_flops, whole_token_params)
from moec.runtime.training.progress import MetricsFile, Progress


@dataclass
class BuildInfo:
    options: Options  # what the build was compiled with (config.json's "options")
    active_params: int
    vocab: int
    flops_per_step: float  # per rank
    fingerprint: str  # of the parameter table: which checkpoints and run dirs are this model's
    router_biases: list  # the aux-loss-free balancing biases, in the order of the forward's expert_counts
    tp_plan: dict  # {weight: how tensor parallelism splits it} (config.json's; empty without --tp)

    @classmethod
    def read(cls, build_dir: Path, model_cls, batch: int, seq_len: int) -> "BuildInfo":
        """The build's facts for a run of batch sequences of seq_len tokens a step; MoecError when the model
        cannot take sequences that long."""
        config = json.loads((Path(build_dir) / "config.json").read_text())
        context = config["result"].get("context")
        if context and seq_len > context:
            raise MoecError(f"--seq-len {seq_len} is longer than the model's context of {context} tokens; "
                            f"pass --seq-len {context} or less")
        options = Options.from_json(config["options"])
        attention, out = attention_flops_per_step(model_cls, batch, seq_len, options.ep)
        vocab = out["logits"].shape[-1]
        active = config["result"]["active_params"]
        tp_plan = config["result"].get("tp_plan", {})
        split = 0  # the parameters whose FLOPs divide by TP
        if options.tp > 1 and options.sequence_parallel:  # the routers and experts run on 1/TP of the tokens too
            split = active - whole_token_params(model_cls, tp_plan)
        elif options.tp > 1:
            split = split_params(model_cls, tp_plan)
        return cls(options, active, vocab, step_flops(active, batch * seq_len, attention, options.tp, split),
                   fingerprint(model_cls), config["result"].get("router_biases", []), tp_plan)


def fingerprint(model_cls) -> str:
    """Names, shapes and dtypes of the model's parameters and buffers (model.py's tables): equal for
    every build of the same model and plan, whatever else of model.py a user edits."""
    module = sys.modules[model_cls.__module__]
    tables = {name: getattr(module, name) for name in ("PARAMS", "BUFFERS", "TIED")}
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()[:16]


def check_vocab(data, build: BuildInfo) -> None:
    if data.max_token >= build.vocab:
        raise MoecError(f"the data has token id {data.max_token} but the model's vocabulary is {build.vocab}; "
                        f"check --data and --data-dtype")


def _mean_over_ranks(values: list[float], device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


class RunLog:
    def __init__(self, run_dir: Path, args, build: BuildInfo, env, start: int, resumed: bool, data_world: int = 0):
        """data_world: the ranks that read different data (the stages of a pipeline read the same); 0: all."""
        self.build, self.env, self.every = build, env, args.log_every
        self.tokens_per_step = args.batch_size * args.grad_accum * args.seq_len * (data_world or env.world)
        self.micro_tokens = args.batch_size * args.seq_len  # per rank: what one forward routes
        if build.options.sequence_parallel and env.world > 1:  # each rank of a TP group routes its share
            self.micro_tokens //= build.options.tp
        self.peak = device_peak_flops(env.device)
        main = env.rank == 0
        if main:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.file = MetricsFile(Path(run_dir) / "metrics.jsonl", start if resumed else None, enabled=main)
        self.bar = Progress(args.steps, start, args.log_every, enabled=main)
        self.total = args.steps
        self.first = start + 1
        self.compiled, self.debug_syncs = args.compile or args.cuda_graphs, args.debug_syncs
        # the first step compiles and warms up; under --cuda-graphs the second records the graphs, which
        # synchronizes: --debug-syncs watches the steps after them
        self.watched_from = self.first + (2 if args.cuda_graphs else 1)
        after_warmup = (self.first // self.every + 1) * self.every  # the first logged step past self.first
        self.profile_step = after_warmup if env.device.type == "cuda" else None
        self.profiler, self.kernels, self.reported = None, None, False
        self.window_time, self.window_steps = 0.0, 0
        self._prev = time.perf_counter()

    def _clock(self, step: int) -> float | None:
        """Seconds of this step, None for a step left out of rates: the first of a process (warm-up,
        compilation) and the profiled one (the profiler's overhead is not the run's)."""
        now = time.perf_counter()
        dt, self._prev = now - self._prev, now
        if step == self.first or step == self.profile_step:
            return None
        self.window_time += dt
        self.window_steps += 1
        return dt

    def begin(self, step: int) -> None:
        """Before step `step`'s work: start the profiler on the step whose kernels are counted; under
        --debug-syncs, past the warm-up steps, make a wait for the GPU an error until a step that reads
        nothing is reported."""
        if step == self.profile_step:
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()
        if self.debug_syncs and step >= self.watched_from and not self.due(step):
            torch.cuda.set_sync_debug_mode("error")

    def _end_profile(self) -> None:
        self.profiler.stop()
        self.kernels = sum(1 for e in self.profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA
                           and not e.name.startswith(("Memcpy", "Memset")))
        self.profiler = None

    def _how_it_runs(self) -> dict:
        """The first record's account of the step's graphs, then its kernel count once counted."""
        record = {}
        if not self.reported and self.compiled:
            from torch._dynamo.utils import counters
            record["graph_breaks"] = sum(counters["graph_break"].values())
            if counters["inductor"]["cudagraph_skips"]:
                record["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
        if self.kernels is not None:
            record["kernels_per_step"], self.kernels = self.kernels, None
        self.reported = True
        return record

    def step(self, step: int, lm: torch.Tensor, out: dict, grad_norm: torch.Tensor, lr: float) -> None:
        """Report step `step`; tensors are read (a wait for the GPU) only at log steps and the last."""
        if self.debug_syncs:
            torch.cuda.set_sync_debug_mode("default")
        if self.profiler is not None:
            self._end_profile()
        dt = self._clock(step)
        lm_value = lm.item() if self.due(step) else None
        self.bar.update(step - 1, lm_value, self.tokens_per_step / dt if dt else None)
        if step % self.every:
            return
        counts = out.get("expert_counts", [])
        o = self.build.options
        load = expert_load(counts, self.micro_tokens, o.routed_topk, o.capacity_factor).to(self.env.device)
        if dist.is_initialized() and counts:
            dist.all_reduce(load)
        aux, z = (float(out[k].detach()) if k in out else 0.0 for k in ("aux_loss", "z_loss"))
        lm_mean, aux, z, norm = _mean_over_ranks([lm_value, aux, z, float(grad_norm)], self.env.device)
        steps_per_s = self.window_steps / self.window_time if self.window_steps else None
        tokens_per_s = self.tokens_per_step * steps_per_s if steps_per_s else None
        mfu = self.build.flops_per_step * steps_per_s / self.peak if self.peak and steps_per_s else None
        self.window_time, self.window_steps = 0.0, 0
        layers = load_summary(load.cpu(), [c.numel() for c in counts], self.env.world)
        # this rank's high-water mark of allocated memory since the start
        peak_gib = torch.cuda.max_memory_allocated(self.env.device) / 2**30 if self.env.device.type == "cuda" else None
        how = self._how_it_runs()
        self.file.write({"kind": "train", "step": step, "loss": lm_mean + aux + z, "lm_loss": lm_mean,
                         "aux_loss": aux, "z_loss": z, "grad_norm": norm, "lr": lr, "tokens_per_s": tokens_per_s,
                         "mfu": mfu, "peak_memory_gib": peak_gib, "expert_load": layers, **how})
        drop = self.build.options.capacity_factor > 0
        load_text = " ".join(f"L{i} {r['max']:.0f}/{r['mean']:.0f} cv {r['cv']:.2f}"
                             + (f" drop {r['dropped']:.1%}" if drop else "") for i, r in enumerate(layers))
        self.bar.message(f"step {step}: lm {lm_mean:.4f}" + (f" aux {aux:.4f} z {z:.4f}" if "aux_loss" in out else "")
                         + f" lr {lr:.2e}"
                         + (f" {tokens_per_s:,.0f} tok/s" if tokens_per_s else "")
                         + (f" MFU {mfu:.1%}" if mfu is not None else "")
                         + (f" peak mem {peak_gib:.1f} GiB" if peak_gib is not None else "")
                         + (f" | expert load max/mean {load_text}" if layers else "")
                         + "".join(f" | {k.replace('_', ' ')} {v}" for k, v in how.items()))

    def due(self, step: int) -> bool:
        """Whether step `step` reads its values: every --log-every steps and the last step."""
        return step % self.every == 0 or step == self.total

    def validation(self, step: int, losses: list[torch.Tensor]) -> None:
        (value,) = _mean_over_ranks([sum(float(v) for v in losses) / max(len(losses), 1)], self.env.device)
        self.file.write({"kind": "val", "step": step, "val_loss": value})
        self.bar.message(f"step {step}: validation loss {value:.4f}")
        self._prev = time.perf_counter()  # evaluation is not training time

    def message(self, text: str) -> None:
        """A line of its own; also used after a checkpoint, whose time is not training time either."""
        self.bar.message(text)
        self._prev = time.perf_counter()
