"""Pipeline parallelism: where to cut the layers into stages, and the bubble a schedule leaves.

A stage is a run of consecutive layers; the first also runs what comes before
the layers (the embedding), the last what comes after them (the final norm,
the head and the loss), so the ends weigh more than their layer count says.
`split` cuts so that the slowest stage is as fast as it can be: the step of a
pipeline goes at the pace of its slowest stage.
"""
from dataclasses import replace

from moec.base.errors import MoecError
from moec.base.options import Options
from moec.cost_model import params
from moec.cost_model import symbols as s
from moec.cost_model.shape import ModelShape, model_values, moe_layer_flags

# schedule -> stages each rank runs; the others of PP_SCHEDULES run one
STAGES_PER_RANK = {"interleaved-1f1b": 2, "zero-bubble": 2}


def stages_per_rank(schedule: str) -> int:
    return STAGES_PER_RANK.get(schedule, 1)


def split(costs: list[float], stages: int, first: float = 0.0, last: float = 0.0) -> list[int]:
    """The layer each stage starts at (and len(costs) at the end): contiguous runs of at least one layer
    whose largest total, the first stage's plus `first` and the last's plus `last`, is the least possible.
    costs: each layer's predicted time (any unit)."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise MoecError(f"{stages} pipeline stages need at least {stages} layers, and the model has {n}; "
                        f"lower --pp (or use a schedule with one stage per rank)")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def weight(s: int, a: int, b: int) -> float:
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
    costs = [float(kinds[f].subs(values)) for f in flags]
    return costs, float((2 * s.V * s.D).subs(values))


def bubble(ranks: int, micro_batches: int, schedule: str) -> float:
    """The share of a step a rank idles in the pipeline's fill and drain: (p - 1) / (v m + p - 1) for p ranks
    running v stages each over m micro-batches (1F1B, and its interleaved form with v = 2); the zero-bubble
    schedules fill most of it with weight-gradient work, which this does not count."""
    v = stages_per_rank(schedule)
    return (ranks - 1) / (v * micro_batches + ranks - 1)
