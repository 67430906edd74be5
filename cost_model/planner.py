"""The planner: enumerate EP x DP x TP x PP (x ZeRO stage, recompute)
factorizations of the GPU count, drop those that do not fit in memory, rank
the rest by predicted step time.

Constraints on a candidate: TP divides the heads and stays inside a node; PP
divides the layers and has at least PP micro-batches; EP divides the routed
experts; EP*DP*micro_batch divides the global batch; ZeRO-3 is not combined
with pipelining (its per-micro-batch parameter gathers defeat it).
"""
import json
import math
from dataclasses import asdict, dataclass, field

from moec.base.errors import MoecError
from moec.cost_model import comm, memory, time_model
from moec.cost_model import symbols as s
from moec.cost_model.hardware import Hardware, load_hardware
from moec.cost_model.layout import Layout
from moec.base.options import Options
from moec.cost_model.shape import ModelShape, model_values

DTYPE_BYTES = 2  # bf16


# every reported quantity, by key
REPORTED = {**{f"mem:{k}": v for k, v in memory.TERMS.items()},
            **{f"time:{k}": v for k, v in time_model.TERMS.items()},
            **{f"comm:{k}": v for k, v in comm.VOLUMES.items()},
            "peak": memory.peak, "step": time_model.step, "mfu": time_model.mfu}


def _eval(key: str, values: dict) -> float:
    return s.evaluate(REPORTED[key], values)


@dataclass
class Plan:
    ep: int
    dp: int
    tp: int
    pp: int
    zero: int
    recompute: bool
    micro_batch: int
    micro_batches: int
    gpus: int
    hardware: str
    model: str
    recompute_experts: bool = False  # `moec compile --recompute-experts`
    # memory.peak (not every term of memory_bytes is alive at once); with PP, the largest of stage_peak_bytes
    peak_memory_bytes: float = 0.0
    # with PP: each stage's predicted peak in the cut `moec compile` makes (pipeline.cut); memory_bytes is an
    # average stage's (L/PP layers, the first stage's micro-batches in flight)
    stage_peak_bytes: list = field(default_factory=list)
    # with PP: the slowest rank's share of the forward FLOPs in that cut, over 1/PP; the per-layer time terms
    # are stretched by it
    pipeline_imbalance: float = 1.0
    step_time_s: float = 0.0
    mfu: float = 0.0
    memory_bytes: dict = field(default_factory=dict)
    time_s: dict = field(default_factory=dict)
    comm_bytes: dict = field(default_factory=dict)
    collectives: dict = field(default_factory=dict)
    why: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def label(self) -> str:
        return (f"EP{self.ep} DP{self.dp} TP{self.tp} PP{self.pp} ZeRO-{self.zero}"
                f"{' recompute' if self.recompute else ''}")


def values_for(plan: Plan, shape: ModelShape, moe: Options, hw: Hardware) -> dict:
    """Every symbol of every formula, for this plan (its collectives already costed)."""
    v = model_values(shape, moe)
    v.update({s.B: plan.micro_batch, s.M: plan.micro_batches, s.b: DTYPE_BYTES, s.EP: plan.ep, s.DP: plan.dp,
              s.TP: plan.tp, s.PP: plan.pp, s.Z: plan.zero, s.R: int(plan.recompute),
              s.R_x: int(plan.recompute_experts), time_model.bw: hw.memory_bandwidth,
              time_model.kappa: hw.elementwise_passes,
              time_model.peak: hw.peak_flops, time_model.eta: hw.gemm_efficiency,
              time_model.m_half: hw.gemm_half_rows, time_model.omega: hw.grad_overlap})
    for name, c in plan.collectives.items():
        v[time_model.alpha[name]] = c["alpha_s"]
        v[time_model.beta[name]] = c["bandwidth_Bps"]
    return v


def gib(n: float) -> str:
    """Bytes as GiB, to two significant digits below one."""
    return f"{n / 2**30:,.1f}" if n >= 2**30 else f"{n / 2**30:.2g}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_plans(shape: ModelShape, moe: Options, gpus: int, hw: Hardware, global_batch: int,
                    micro_batch: int = 1) -> list[tuple[Plan, dict]]:
    """Every candidate that satisfies the structural constraints, with its costs."""
    # every MoE layer's routed experts: --pyramid gives the last layers another count
    routed = [e * moe.granularity for e in [moe.experts] + ([moe.pyramid[0]] if moe.pyramid else [])]
    layout = Layout(hw, gpus, moe.routed_topk, moe.max_nodes_per_token)
    out = []
    for tp in _divisors(gpus):
        if tp > hw.gpus_per_node or shape.heads % tp or shape.kv_heads % tp:
            continue
        for pp in _divisors(gpus // tp):
            if shape.layers % pp:
                continue
            for ep in _divisors(gpus // (tp * pp)):
                dp = gpus // (tp * pp * ep)
                if any(e % ep for e in routed) or global_batch % (micro_batch * ep * dp):
                    continue
                m = global_batch // (micro_batch * ep * dp)
                if pp > 1 and m < pp:
                    continue
                costs = layout.costs(ep, dp, tp, pp)
                for zero in range(4):
                    if zero == 3 and pp > 1:
                        continue
                    for rc in (False, True):
                        out.append((Plan(ep, dp, tp, pp, zero, rc, micro_batch, m, gpus, hw.name, shape.name),
                                    costs))
    return out


def predict(plan: Plan, shape: ModelShape, moe: Options, hw: Hardware, costs: dict) -> Plan:
    plan.collectives = {n: {"algorithm": c.algorithm, "alpha_s": c.alpha, "bandwidth_Bps": c.bandwidth,
                            "bottleneck": c.bottleneck} for n, c in costs.items()}
    v = values_for(plan, shape, moe, hw)
    plan.memory_bytes = {k[4:]: _eval(k, v) for k in REPORTED if k.startswith("mem:")}
    plan.time_s = {k[5:]: _eval(k, v) for k in REPORTED if k.startswith("time:")}
    plan.comm_bytes = {k[5:]: _eval(k, v) for k in REPORTED if k.startswith("comm:")}
    plan.step_time_s, plan.mfu, plan.peak_memory_bytes = _eval("step", v), _eval("mfu", v), _eval("peak", v)
    return plan


def rank_plans(shape: ModelShape, moe: Options, gpus: int, hardware, global_batch: int = 0,
               micro_batch: int = 1, allowed=None) -> tuple[list[Plan], int]:
    """Plans that fit, fastest first, and how many candidates were enumerated (and allowed). allowed(plan):
    whether a candidate may be chosen at all (the compiler passes what its training program carries out)."""
    if gpus < 1 or micro_batch < 1 or global_batch < 0:
        raise MoecError("--gpus and --micro-batch must be at least 1, --global-batch at least 0 (0: default)")
    hw = hardware if isinstance(hardware, Hardware) else load_hardware(hardware)
    global_batch = global_batch or _default_batch(gpus, shape.seq_len)
    every = enumerate_plans(shape, moe, gpus, hw, global_batch, micro_batch)
    cands = [(p, c) for p, c in every if allowed is None or allowed(p)]
    among = "" if len(cands) == len(every) else f" among the {len(cands)} of {len(every)} plans train.py runs"
    if not cands:
        raise MoecError(f"no EP x DP x TP x PP split of {gpus} GPUs suits {shape.name}{among}: EP must divide "
                        f"{moe.experts * moe.granularity} experts, TP the heads, PP the layers, and EP*DP*micro-batch "
                        f"the global batch of {global_batch}; change --gpus or --global-batch")
    plans = [_cut_stages(predict(p, shape, moe, hw, c), shape, moe, hw) for p, c in cands]
    fit = sorted((p for p in plans if p.peak_memory_bytes <= hw.memory_bytes),
                 key=lambda p: (p.step_time_s, p.peak_memory_bytes))
    if not fit:
        least = min(plans, key=lambda p: p.peak_memory_bytes)
        raise MoecError(f"no parallel plan of {shape.name} fits {gpus} x {hw.gpu_name} "
                        f"({hw.memory_bytes / 2**30:.1f} GiB usable){among}; the leanest needs "
                        f"{least.peak_memory_bytes / 2**30:.1f} GiB per GPU; use more GPUs or a smaller batch"
                        f"{' (`moec plan` ranks the others)' if among else ''}")
    for rank, p in enumerate(fit, 1):  # every one: `moec plan` quotes the best that train.py runs
        p.why = _why(p, rank, fit, len(plans), hw)
    return fit, len(plans)


# time_model's terms that a stage's layers do on every micro-batch, at the pace of the slowest pipeline rank
PER_LAYER_TERMS = ("compute", "activation traffic", "all-to-all", "tensor parallel")


def _cut_stages(plan: Plan, shape: ModelShape, moe: Options, hw: Hardware) -> Plan:
    """A pipelined plan as the cut the compile makes gives it: the fastest cut whose stages each fit a GPU, or
    where none does, the fastest cut (its largest stage then over the GPU). Its peak becomes the largest
    stage's: memory.peak is an average stage's, and the cut can make a stage heavier (the first keeps the most
    micro-batches in flight, the last holds the head and the logits). The per-layer time terms stretch by the
    slowest rank's share of the forward FLOPs over the average's: a pipeline goes at its slowest rank's pace,
    and a cut that moves layers off a stage whose memory is full can leave a rank with more than 1/PP."""
    if plan.pp == 1:
        return plan
    from moec.base.options import rank_stages, stages_per_rank
    from moec.cost_model.pipeline import cut
    stages, values = plan.pp * stages_per_rank(moe.pp_schedule), values_for(plan, shape, moe, hw)
    try:
        _, shares, held = cut(shape, moe, stages, values, hw.memory_bytes)
    except MoecError:  # no cut fits
        _, shares, held = cut(shape, moe, stages, values)
    plan.stage_peak_bytes, plan.peak_memory_bytes = held, max(held)
    plan.pipeline_imbalance = max(sum(shares[i] for i in rank_stages(moe.pp_schedule, r, plan.pp))
                                  for r in range(plan.pp)) * plan.pp
    step = plan.step_time_s
    for term in PER_LAYER_TERMS:
        plan.time_s[term] *= plan.pipeline_imbalance
    plan.step_time_s = sum(plan.time_s.values())
    plan.mfu *= step / plan.step_time_s
    return plan


def best_plan(shape: ModelShape, moe_options: Options, gpus: int, hardware, global_batch: int = 0,
              micro_batch: int = 1) -> Plan:
    """The fastest plan that fits: what `moec compile --gpus N --hardware NAME` uses."""
    return rank_plans(shape, moe_options, gpus, hardware, global_batch, micro_batch)[0][0]


def single_gpu_prediction(shape: ModelShape, moe: Options, hardware, micro_batch: int,
                          recompute_experts: bool = False, micro_batches: int = 1) -> Plan:
    """The prediction for the emitted training program on one GPU: what bench/planner.py checks."""
    hw = hardware if isinstance(hardware, Hardware) else load_hardware(hardware)
    plan = Plan(1, 1, 1, 1, 0, False, micro_batch, micro_batches, 1, hw.name, shape.name,
                recompute_experts=recompute_experts)
    layout = Layout(hw, 1, moe.routed_topk, moe.max_nodes_per_token)
    return predict(plan, shape, moe, hw, layout.costs(1, 1, 1, 1))


def _default_batch(gpus: int, seq_len: int) -> int:
    """About four million tokens per step, and at least one sequence per GPU."""
    return max(gpus, 2 ** round(math.log2(max(4 * 2**20 // seq_len, 1))))


def _why(p: Plan, rank: int, fit: list[Plan], enumerated: int, hw: Hardware) -> str:
    top = max(p.time_s, key=p.time_s.get)
    stage = " (its largest stage)" if p.pp > 1 else ""
    text = (f"{p.label()}: predicted {p.step_time_s * 1e3:.1f} ms/step, MFU {p.mfu:.1%}, "
            f"{gib(p.peak_memory_bytes)} of {gib(hw.memory_bytes)} GiB{stage}; rank {rank} of "
            f"{len(fit)} plans that fit ({enumerated} enumerated); largest term: {top}")
    if p is fit[0] and len(fit) > 1:
        nxt = fit[1]
        text += f"; next best {nxt.label()} is {nxt.step_time_s / p.step_time_s - 1:.1%} slower"
    return text
