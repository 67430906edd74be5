"""Pipeline parallelism: where to cut the layers into stages, and the bubble a schedule leaves.

A stage is a run of consecutive layers; the first also runs what comes before
the layers (the embedding), the last what comes after them (the final norm,
the head and the loss), so the ends weigh more than their layer count says.
`split` cuts so that the slowest stage is as fast as it can be: the step of a
pipeline goes at the pace of its slowest stage.
"""
import functools
from dataclasses import replace

import sympy as sp

from moec.base.errors import MoecError
from moec.base.options import Options, stages_per_rank
from moec.cost_model import memory, params
from moec.cost_model import symbols as s
from moec.cost_model.shape import ModelShape, model_values, moe_layer_flags

def split(costs: list[float], stages: int, first: float = 0.0, last: float = 0.0, fits=None) -> list[int]:
    """The layer each stage starts at (and len(costs) at the end): contiguous runs of at least one layer
    whose largest total, the first stage's plus `first` and the last's plus `last`, is the least possible.
    costs: each layer's predicted time (any unit). fits(s, a, b): whether stage s may hold layers [a, b)
    (its memory); no split where every stage fits is a MoecError."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise MoecError(f"{stages} pipeline stages need at least {stages} layers, and the model has {n}; "
                        f"lower --pp (or use a schedule with one stage per rank)")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def weight(s: int, a: int, b: int) -> float:
        if fits is not None and not fits(s, a, b):
            return float("inf")
        return prefix[b] - prefix[a] + (first if s == 0 else 0.0) + (last if s == stages - 1 else 0.0)

    # best[s][b]: the least largest stage over layers [0, b) cut into s + 1 stages; cut[s][b] where the last starts
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for b in range(1, n + 1):
        best[0][b] = weight(0, 0, b)
    for s in range(1, stages):
        for b in range(s + 1, n + 1):
            for a in range(s, b):
                w = max(best[s - 1][a], weight(s, a, b))
                if w < best[s][b]:
                    best[s][b], cut[s][b] = w, a
    if best[stages - 1][n] == float("inf"):
        raise MoecError(f"no cut of the {n} layers into {stages} pipeline stages fits each stage's memory: "
                        f"use more stages, more GPUs (to shard experts and optimizer state), or a smaller micro-batch")
    bounds, b = [n], n
    for s in range(stages - 1, 0, -1):
        b = cut[s][b]
        bounds.append(b)
    return [0] + bounds[::-1]


def layer_flops(shape: ModelShape, moe: Options) -> tuple[list[float], float]:
    """(forward FLOPs per token of each layer, of the head), from params.py's counts: a layer's attention
    (projections, and scores over S/2 keys on average) and its dense FFN or the experts a token uses and the
    router; the head is a V x D GEMM (the embedding a lookup)."""
    dense = moe.dense
    values = model_values(shape, replace(moe, dense=False, first_dense=0) if dense else moe)
    attention = 2 * params.attention + 2 * s.S * s.D
    kinds = {False: attention + 2 * params.ffn_dense,
             True: attention + 2 * ((s.K * s.G + s.N_s) * params.expert + params.router)}
    flags = [False] * shape.layers if dense else moe_layer_flags(shape, moe)
    kinds = {f: s.evaluate(e, values) for f, e in kinds.items()}
    costs = [kinds[f] for f in flags]
    return costs, s.evaluate(2 * s.V * s.D, values)


def cut(shape: ModelShape, moe: Options, stages: int, values: dict | None = None, capacity: float = 0.0):
    """The stage split `moec compile` writes and `moec plan --explain` shows: (the layer each stage starts at,
    then the layer count; each stage's share of the forward FLOPs; each stage's predicted peak bytes, None
    without a plan's values). The fastest split whose stages each fit `capacity` bytes, when given."""
    costs, head = layer_flops(shape, moe)
    held = stage_memory(shape, moe, values, stages) if values is not None else None
    fits = (lambda i, a, b: held(i, a, b) <= capacity) if held is not None and capacity else None
    bounds = split(costs, stages, last=head, fits=fits)
    spans = list(zip(bounds, bounds[1:]))
    flops = [sum(costs[a:b]) + (head if b == len(costs) else 0.0) for a, b in spans]
    return bounds, [x / sum(flops) for x in flops], held and [held(i, a, b) for i, (a, b) in enumerate(spans)]


def bubble(ranks: int, micro_batches: int, schedule: str) -> float:
    """The share of a step a rank idles in the pipeline's fill and drain: (p - 1) / (v m + p - 1) for p ranks
    running v stages each over m micro-batches (1F1B, and its interleaved form with v = 2); the zero-bubble
    schedules fill most of it with weight-gradient work, which this does not count."""
    v = stages_per_rank(schedule)
    return (ranks - 1) / (v * micro_batches + ranks - 1)


# the stage's parameters outside the routed experts, those of them TP splits, and the routed experts'
_p_d, _p_t, _p_x = sp.symbols("p_d p_t p_x")


def _per_stage(expr: sp.Expr):
    """expr as (the plan's other symbols, a function of p_d, p_t, p_x and them)."""
    return s.lambdified(sp.sympify(expr).xreplace({memory.P_d: _p_d, memory.P_t: _p_t, memory.P_x: _p_x}),
                        (_p_d, _p_t, _p_x))


def stage_memory(shape: ModelShape, moe: Options, values: dict, stages: int):
    """stage_memory(s, a, b): the bytes stage s of `stages` holds at its peak with layers [a, b), by memory.py's
    terms for those layers alone: fp32 weights and Adam state (attention, dense FFNs and shared experts over TP,
    routed experts over EP, ZeRO's sharding), then the larger of the gradients and what backward starts with
    (the bf16 weight copies, the activations of the micro-batches in flight, an MoE layer's all-to-all buffers,
    on the last stage the logits). Under 1F1B the stage on pipeline rank r has min(PP - r, M) micro-batches in
    flight. The first stage holds the embedding, the last the head (tied embeddings: a copy on each, one when
    there is one stage). values: the plan's symbol values (planner.values_for)."""
    v = {**model_values(shape, replace(moe, dense=False, first_dense=0) if moe.dense else moe), **values,
         s.PP: 1}  # memory.py's terms for one stage's layers alone

    def per_stage(expr):  # expr as a function of (p_d, p_t, p_x), every other symbol the plan's value
        syms, fn = _per_stage(expr)
        rest = [float(v[x]) for x in syms]  # floats: sympy numbers would make every evaluation symbolic
        return lambda d, t, x: fn(d, t, x, *rest)

    def ev(expr) -> float:
        return float(per_stage(expr)(0, 0, 0))

    ranks, micro_batches, recompute = int(values[s.PP]), int(values[s.M]), bool(values.get(s.R, 0))
    flags = [False] * shape.layers if moe.dense else moe_layer_flags(shape, moe)
    dense_params = {False: ev(params.attention + params.ffn_dense),
                    True: ev(params.attention + s.N_s * params.expert + params.router)}
    split_params = {False: dense_params[False], True: ev(params.attention + s.N_s * params.expert)}  # TP's
    expert_params = {False: 0.0, True: ev(s.E * s.G * params.expert)}
    acts = {False: ev(memory.tokens_local * (memory.act_attention + memory.act_ffn)),
            True: ev(memory.tokens_local * (memory.act_attention + memory.act_moe))}
    kept = {False: ev(memory.tokens_local * memory.kept_input),  # what a layer keeps under recompute
            True: ev(memory.tokens_local * (memory.kept_input + memory.kept_router_input))}
    embedding, logits, tied = ev(s.V * s.D), ev(memory.logits), int(v[s.t])
    all_to_all = ev(memory.all_to_all_buffers)
    held, gradients = per_stage(memory.parameters + memory.optimizer), per_stage(memory.gradients)
    copies = per_stage(memory.weight_copies)

    moe_before = [0]  # MoE layers before each layer: a run of layers holds what its count of each kind does
    for f in flags:
        moe_before.append(moe_before[-1] + f)

    @functools.cache  # the split asks about every run of layers; runs of the same make-up hold the same
    def held_by(stage: int, moe_layers: int, dense_layers: int) -> float:
        count = {True: moe_layers, False: dense_layers}
        ends = (stage == 0) + (stage == stages - 1)
        sizes = (sum(count[f] * dense_params[f] for f in count) + embedding * (ends if stages > 1 else 2 - tied),
                 sum(count[f] * split_params[f] for f in count), count[True] * expert_params[True])
        in_flight = min(ranks - stage % ranks, micro_batches)
        if recompute:  # each layer's input kept, one layer rebuilt at a time
            activations = in_flight * sum(count[f] * kept[f] for f in count) + max(acts[f] for f in count if count[f])
        else:
            activations = in_flight * sum(count[f] * acts[f] for f in count)
        transient = copies(*sizes) + activations + (logits if stage == stages - 1 else 0.0) \
            + (all_to_all if moe_layers else 0.0)
        return float(held(*sizes) + max(gradients(*sizes), transient))

    def bytes_(stage: int, a: int, b: int) -> float:
        moe_layers = moe_before[b] - moe_before[a]
        return held_by(stage, moe_layers, b - a - moe_layers)

    return bytes_
