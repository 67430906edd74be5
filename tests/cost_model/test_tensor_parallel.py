"""TP in the cost model as the training program runs it: attention, dense FFNs and shared experts split
(Megatron column/row); without sequence parallelism the router, routed experts, head and every activation
outside the split linears whole on each TP rank, with it (--sequence-parallel) the tokens outside the split
linears shared out over the TP ranks; one all-reduce per split region forward and one backward."""
import pytest

from moec.base.options import Options
from moec.cost_model import comm, memory, params, time_model
from moec.cost_model import symbols as s
from moec.cost_model.hardware import load_hardware
from moec.cost_model.pipeline import stage_memory
from moec.cost_model.planner import Plan, rank_plans, values_for
from moec.cost_model.shape import ModelShape, model_values

SHAPE = ModelShape(layers=8, hidden=1024, ffn=4096, vocab=32000, heads=16, kv_heads=4, gated=True,
                   tied_embeddings=False, seq_len=1024)
MOE = Options(experts=16, topk=2)  # every layer MoE, no shared experts
T = SHAPE.seq_len  # tokens of a micro-batch of one sequence


def evaluate(expr, moe=MOE, ep=4, dp=1, tp=1, pp=1, zero=0, recompute=0, m=4):
    v = model_values(SHAPE, moe)
    v.update({s.B: 1, s.M: m, s.b: 2, s.EP: ep, s.DP: dp, s.TP: tp, s.PP: pp, s.Z: zero, s.R: recompute,
              s.R_x: 0, time_model.eta: 0.6, time_model.peak: 1e15, time_model.m_half: 256})  # an H100's scale
    return float(s.expand(expr).xreplace(v))


def test_tp_halves_attention_weights_and_leaves_routed_experts():
    """All layers MoE without shared experts: what TP splits is exactly the attention."""
    attention = evaluate(s.L * params.attention)
    assert evaluate(memory.P_t) == pytest.approx(attention)
    for term, per_param in ((memory.parameters, 4), (memory.gradients, 4), (memory.optimizer, 8)):
        assert evaluate(term, tp=1) - evaluate(term, tp=2) == pytest.approx(per_param * attention / 2)
    # the routed experts' share is P_x / EP whatever TP is
    assert evaluate(memory.experts_local, tp=2) == evaluate(memory.experts_local, tp=1) == \
        pytest.approx(evaluate(memory.P_x) / 4)


def test_tp_splits_dense_ffns_and_shared_experts_but_not_the_router_or_head():
    moe = Options(experts=16, topk=2, shared_experts=2, moe_every=2)  # layers 0, 2, 4, 6 MoE
    d, f, fe = SHAPE.hidden, SHAPE.ffn, SHAPE.ffn
    split = evaluate(s.L * params.attention, moe) + 4 * 3 * d * f + 4 * 2 * 3 * d * fe
    whole = 4 * d * 16 + 2 * SHAPE.vocab * d  # routers of the 4 MoE layers, embedding and head
    assert evaluate(memory.dense_local, moe, tp=4) == pytest.approx(split / 4 + whole)


def test_activations_outside_the_split_linears_do_not_shrink():
    one, two = evaluate(memory.activations, tp=1), evaluate(memory.activations, tp=2)
    # only Q, K, V and the attention output (per token 2 D + 2 D H_kv / H) halve; the residual stream, the
    # norms, the router logits, the routed copies and the experts' pre-activations stay whole
    heads = 2 * SHAPE.hidden * (2 + 2 * SHAPE.kv_heads / SHAPE.heads)  # bytes per token and layer at TP1
    assert one - two == pytest.approx(SHAPE.layers * T * heads / 2)  # one micro-batch in flight without PP
    assert evaluate(memory.act_moe, tp=2) == evaluate(memory.act_moe, tp=1)
    for term in (memory.logits, memory.all_to_all_buffers):
        assert evaluate(term, tp=8) == evaluate(term, tp=1) > 0


def test_tp_all_reduce_count_and_volume_by_hand():
    # half the layers dense: 4 dense layers (attention + FFN) and 4 MoE layers without shared experts (attention)
    moe = Options(experts=16, topk=2, moe_every=2)
    regions, m, tp = 4 * 2 + 4 * 1, 3, 4
    assert evaluate(comm.tp_calls, moe, tp=tp, m=m) == 2 * regions * m
    # forward: the row-parallel output in bf16; backward: the fp32 gradient of the column-parallel input;
    # each a ring all-reduce of all T x D elements sending 2 (TP - 1) / TP of them
    per_region = (2 + 4) * T * SHAPE.hidden * 2 * 3 / 4
    assert evaluate(comm.tp_volume, moe, tp=tp, m=m) == pytest.approx(regions * m * per_region)
    # shared experts are one more region in each MoE layer; full recompute repeats the forward all-reduces
    shared = Options(experts=16, topk=2, moe_every=2, shared_experts=1)
    assert evaluate(comm.tp_calls, shared, tp=tp, m=m) == 2 * 16 * m
    assert evaluate(comm.tp_calls, moe, tp=tp, m=m, recompute=1) == 3 * regions * m
    assert evaluate(comm.tp_volume, moe, tp=1) == 0


def test_tp_compute_splits_attention_but_not_routed_experts():
    hw = {time_model.peak: 1e15, time_model.eta: 0.5, time_model.m_half: 0}
    v = model_values(SHAPE, MOE)
    v.update({s.B: 1, s.M: 1, s.EP: 4, s.PP: 1, s.R: 0, s.R_x: 0, **hw})
    compute = {tp: float(s.expand(time_model.compute).xreplace({**v, s.TP: tp})) for tp in (1, 2)}
    attention = 2 * SHAPE.layers * (evaluate(params.attention) + SHAPE.seq_len * SHAPE.hidden)  # FLOPs/token
    assert compute[1] - compute[2] == pytest.approx(3 * T * attention / 2 / 0.5e15)


def test_stage_memory_splits_attention_with_tp():
    hw = load_hardware("dgx_h100")

    def stage(tp):
        plan = Plan(4, 1, tp, 2, 0, False, 1, 4, 8 * tp, hw.name, SHAPE.name)
        held = stage_memory(SHAPE, MOE, values_for(plan, SHAPE, MOE, hw), 2)
        return held(1, 4, 8)  # the last stage: layers 4-7 and the head

    attention = 4 * evaluate(params.attention)
    heads = 2 * SHAPE.hidden * (2 + 2 * SHAPE.kv_heads / SHAPE.heads) * T * 4  # 4 layers, 1 micro-batch in flight
    # fp32 weights and Adam state and the bf16 copies (12 + 2 bytes per parameter) of half the attention, and half of
    # its Q, K, V and output activations
    assert stage(1) - stage(2) == pytest.approx(14 * attention / 2 + heads / 2)


LONG = ModelShape(layers=24, hidden=2048, ffn=8192, vocab=32000, heads=16, kv_heads=16, gated=True,
                  tied_embeddings=False, seq_len=32768, name="long")
LONG_MOE = Options(experts=8, topk=1, moe_every=8)


def runs(plan) -> bool:
    return not any(LONG_MOE.with_plan(plan).planner_problems())


def test_planner_chooses_tp_when_the_model_is_too_large_otherwise():
    """32k-token sequences of a mostly dense model: no plan without TP, PP or whole-layer recomputation holds one
    sequence's activations on an 80 GB GPU; TP, which splits the attention and FFN intermediates, does, and beats
    the pipelines that fit (their cuts move layers off the first stage, which keeps the most micro-batches in
    flight) and the plans that recompute (which run every layer's forward twice)."""
    ranked, _ = rank_plans(LONG, LONG_MOE, 16, "dgx_h100", global_batch=16, allowed=runs)
    assert ranked[0].tp > 1 and not ranked[0].recompute and all(p.tp > 1 or p.pp > 1 or p.recompute for p in ranked)
    assert any(p.recompute and p.tp == p.pp == 1 for p in ranked)  # the planner may choose them
    assert ranked[0].ep >= ranked[0].tp  # the program's constraint, which the planner leaves to allowed
    # at 16k tokens a plan without TP fits, and wins: TP repeats the routed experts and head on every rank
    short = ModelShape(**{**LONG.__dict__, "seq_len": 16384})
    assert rank_plans(short, LONG_MOE, 16, "dgx_h100", global_batch=16, allowed=runs)[0][0].tp == 1


def test_planner_problems_no_longer_skip_tp():
    o = Options(experts=8, topk=2, ep=2, tp=2, dp=1, gpus=4)
    assert list(o.planner_problems()) == list(o.runtime_problems()) == []


def test_what_tp_splits_is_the_blocks_outside_the_routed_experts():
    import sympy as sp
    assert sp.simplify(params.tp_split - (params.blocks - params.experts)) == 0


SP = Options(experts=16, topk=2, sequence_parallel=True)


def test_sequence_parallelism_shares_out_the_tokens_outside_the_split_linears():
    # the MoE layer (no shared experts), the dispatch buffers and volume: this rank's half of the tokens
    for term in (memory.act_moe, memory.all_to_all_buffers, comm.a2a_volume):
        assert evaluate(term, SP, tp=2) == pytest.approx(evaluate(term, tp=2) / 2)
    # the logits are gathered before the head; the TP collectives send as much as the all-reduces they replace
    for term in (memory.logits, comm.tp_volume):
        assert evaluate(term, SP, tp=2) == evaluate(term, tp=2) > 0
    # an attention layer's norm input (D) halves; its output as the projections keep it is whole
    assert evaluate(memory.act_attention, tp=2) - evaluate(memory.act_attention, SP, tp=2) == \
        pytest.approx(2 * SHAPE.hidden / 2)
    # with one TP rank there is nothing to share out
    for term in (memory.activations, time_model.compute):
        assert evaluate(term, SP, tp=1) == pytest.approx(evaluate(term, tp=1))


def test_sequence_parallelism_divides_the_routed_experts_work_over_tp():
    tm = time_model
    experts = tm.tokens_run * 3 * tm.C_x * memory.tp_share / (tm.eta_x * tm.peak)  # a rank's share, shorter GEMMs
    routers = tm.tokens_run * 3 * 2 * s.f * s.L * params.router * memory.tp_share / (tm.eta * tm.peak)
    saved = evaluate(tm.compute, tp=2) - evaluate(tm.compute, SP, tp=2)
    assert saved == pytest.approx(evaluate(experts + routers, tp=2) - evaluate(experts + routers, SP, tp=2))
    # half the rows, at a lower GEMM efficiency: less than half the experts' time is saved, but some is
    assert 0 < saved < evaluate(experts, tp=2) / 2


def test_the_planner_asked_for_sequence_parallelism_plans_tp_without_pp():
    shape = ModelShape(layers=8, hidden=4096, ffn=14336, vocab=32000, heads=32, kv_heads=8, gated=True,
                       tied_embeddings=False, seq_len=8192)
    moe = Options(experts=8, topk=2, sequence_parallel=True, gpus=16)
    runs = lambda plan: not any(moe.with_plan(plan).planner_problems())  # noqa: E731  as the compiler passes it
    ranked, _ = rank_plans(shape, moe, 16, load_hardware("dgx_h100"), allowed=runs)
    assert ranked and all(p.tp > 1 and p.pp == 1 for p in ranked)
