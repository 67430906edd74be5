"""Memory, communication and time formulas, evaluated for chosen plans."""
import pytest

from moec.cost_model import comm, memory, time_model
from moec.cost_model import symbols as s
from moec.base.options import Options
from moec.cost_model.shape import ModelShape, model_values

SHAPE = ModelShape(layers=8, hidden=1024, ffn=4096, vocab=32000, heads=16, kv_heads=16, gated=False,
                   tied_embeddings=True, seq_len=1024)
MOE = Options(experts=16, topk=2)


def evaluate(expr, ep=1, dp=1, tp=1, pp=1, zero=0, recompute=0, m=4, extra=None):
    v = model_values(SHAPE, MOE)
    v.update({s.B: 1, s.M: m, s.b: 2, s.EP: ep, s.DP: dp, s.TP: tp, s.PP: pp, s.Z: zero, s.R: recompute,
              s.R_x: 0})
    v.update(extra or {})
    return float(s.expand(expr).xreplace(v))


def test_model_states_by_hand():
    """No sharding: 4 + 4 + 8 bytes per parameter (fp32 weights, gradients, Adam's m and v)."""
    p_total = evaluate(memory.P_d + memory.P_x)
    states = evaluate(memory.parameters + memory.gradients + memory.optimizer)
    assert states == pytest.approx(16 * p_total)


def test_experts_divide_by_ep_and_their_optimizer_by_expert_dp():
    p_x = evaluate(memory.P_x)
    p_d = evaluate(memory.P_d)
    assert evaluate(memory.parameters, ep=8, dp=2) == pytest.approx(4 * (p_d + p_x / 8))
    # ZeRO-1: the dense optimizer state shards over EP*DP = 16 ranks, the experts' over DP = 2
    assert evaluate(memory.optimizer, ep=8, dp=2, zero=1) == pytest.approx(8 * (p_d / 16 + p_x / 8 / 2))


@pytest.mark.parametrize("term,stage", [(memory.optimizer, 1), (memory.gradients, 2), (memory.parameters, 3)])
def test_zero_stage_shards_its_state(term, stage):
    before, after = evaluate(term, dp=4, zero=stage - 1), evaluate(term, dp=4, zero=stage)
    assert after == pytest.approx(before / 4)


def test_recompute_and_pipeline_activations():
    full = evaluate(memory.activations)
    # recompute keeps each layer's fp32 input and an MoE layer's fp32 router input (every layer MoE here), and
    # one layer rebuilt at a time
    d, t = SHAPE.hidden, SHAPE.seq_len
    rebuilt = evaluate(memory.tokens_local * memory.act_rebuilt, recompute=1)
    assert evaluate(memory.activations, recompute=1) == pytest.approx(SHAPE.layers * t * 2 * 4 * d + rebuilt)
    assert evaluate(memory.activations, recompute=1) < full / 2
    # 1F1B keeps PP micro-batches in flight on 1/PP of the layers: same total, fewer when M < PP
    assert evaluate(memory.activations, pp=4, m=8) == pytest.approx(full)
    assert evaluate(memory.activations, pp=4, m=2) == pytest.approx(full / 2)


def test_all_to_all_volume():
    assert evaluate(comm.a2a_volume, ep=1) == 0
    # 4 all-to-alls per layer and micro-batch, each sends 7/8 of S*K*D*b bytes
    expected = 4 * SHAPE.layers * 4 * SHAPE.seq_len * 2 * SHAPE.hidden * 2 * 7 / 8
    assert evaluate(comm.a2a_volume, ep=8) == pytest.approx(expected)
    assert evaluate(memory.all_to_all_buffers, ep=1) == 0


def test_gradient_volume_by_zero_stage():
    p_d = evaluate(memory.P_d)
    ring = 2 * 3 / 4 * 4 * p_d  # two passes of 3/4 of the fp32 gradients
    assert evaluate(comm.grad_dense_volume, ep=2, dp=2, zero=1) == pytest.approx(ring)
    assert evaluate(comm.grad_dense_volume, ep=2, dp=2, zero=2, m=4) == pytest.approx(ring * 5 / 2)
    assert evaluate(comm.grad_dense_volume, ep=2, dp=2, zero=3, m=4) == pytest.approx(ring * 12 / 2)


def test_step_time_terms_add_up_and_bubble_grows_with_pp():
    hw = {time_model.peak: 1e15, time_model.eta: 0.5, time_model.omega: 0.0, time_model.m_half: 0,
          time_model.bw: 1e30, time_model.kappa: 4}  # no weight traffic: EP's smaller expert share would hide the all-to-all
    hw.update({a: 1e-5 for a in time_model.alpha.values()})
    hw.update({b_: 1e11 for b_ in time_model.beta.values()})

    def step(**kw):
        return evaluate(time_model.step, extra=hw, **kw)

    compute = evaluate(time_model.TERMS["compute"], extra=hw)
    assert compute == pytest.approx(evaluate(3 * time_model.C * 4 * SHAPE.seq_len) / 0.5e15)
    # half the layers per GPU, stretched by the bubble (M + PP - 1) / M
    half = evaluate(time_model.TERMS["compute"], pp=2, m=4, extra=hw)
    assert half == pytest.approx(compute / 2 * 5 / 4)
    assert step(pp=2, m=4) > step(pp=1, m=4) / 2
    assert step(ep=4) > step(ep=1)  # the all-to-all is not free when GEMMs do not care


def test_weight_traffic_per_parameter():
    """One GPU, M micro-batches: AdamW 28 and clipping 12 bytes once, autocast's casts 12 bytes each micro-batch."""
    p_total = evaluate(memory.P_d + memory.P_x)
    got = evaluate(time_model.TERMS["weight traffic"], m=4, extra={time_model.bw: 1e12})
    assert got == pytest.approx((28 + 12 + 12 * 4) * p_total / 1e12)
    # ZeRO-1 over 4 ranks shards the optimizer's pass, not the casts or clipping
    sharded = evaluate(time_model.TERMS["weight traffic"], dp=4, zero=1, m=4, extra={time_model.bw: 1e12})
    assert sharded == pytest.approx((28 / 4 + 12 + 12 * 4) * p_total / 1e12)


def test_expert_recompute_trades_activations_for_a_first_gemm_pass():
    hw = {time_model.peak: 1e15, time_model.eta: 0.5, time_model.m_half: 0}
    kept, dropped = (evaluate(memory.activations, extra={s.R_x: r}) for r in (0, 1))
    # plain FFN (n_W = 2): one F_e-wide bf16 pre-activation per routed slot, K = 2 slots per token, every
    # layer MoE; one micro-batch of S tokens in flight without pipelining
    per_token = 2 * MOE.topk * SHAPE.ffn
    assert kept - dropped == pytest.approx(SHAPE.seq_len * SHAPE.layers * per_token)
    slow, fast = (evaluate(time_model.TERMS["compute"], extra=hw | {s.R_x: r}) for r in (1, 0))
    first_gemm = 2 * SHAPE.hidden * SHAPE.ffn * MOE.topk * SHAPE.layers  # FLOPs per token, forward
    assert slow - fast == pytest.approx(4 * SHAPE.seq_len * first_gemm / 0.5e15)


def test_peak_holds_gradients_or_activations_not_both():
    states = evaluate(memory.parameters + memory.optimizer)
    grads = evaluate(memory.gradients)
    for batch in (1, 64):
        transient = evaluate(memory.transient, extra={s.B: batch})
        assert evaluate(memory.peak, extra={s.B: batch}) == pytest.approx(states + max(grads, transient))
    # a long batch is activation-bound, a short one gradient-bound
    assert evaluate(memory.transient, extra={s.B: 64}) > grads > evaluate(memory.transient, extra={s.B: 1, s.S: 8})


def test_recompute_adds_elementwise_traffic_instead_of_saving_it():
    """Recomputation keeps fewer activations but computes them again: the memory-bound work grows."""
    hw = {time_model.bw: 1e12, time_model.kappa: 18}
    act = time_model.TERMS["activation traffic"]
    plain, experts, full = (evaluate(act, recompute=r, extra=hw | {s.R_x: x}) for r, x in ((0, 0), (0, 1), (1, 0)))
    # the experts' GEMMs write their pre-activations once more: one F_e-wide bf16 row per routed slot
    # (plain FFN), K slots per token, every layer, M = 4 micro-batches of S tokens
    assert experts - plain == pytest.approx(4 * SHAPE.seq_len * SHAPE.layers * 2 * MOE.topk * SHAPE.ffn / 1e12)
    logits = 4 * time_model.LOGIT_TRAFFIC * SHAPE.seq_len * SHAPE.vocab / 1e12
    assert full - plain == pytest.approx((plain - logits) / 3)  # forward's third of the kappa passes again
