"""Memory, communication and time formulas, evaluated for chosen plans."""
import pytest

from moec.cost_model import comm, memory, time_model
from moec.cost_model import symbols as s
from moec.cost_model.shape import ModelShape, MoeOptions, model_values

SHAPE = ModelShape(layers=8, hidden=1024, ffn=4096, vocab=32000, heads=16, kv_heads=16, gated=False,
                   tied_embeddings=True, seq_len=1024)
MOE = MoeOptions(experts=16, topk=2)


def evaluate(expr, ep=1, dp=1, tp=1, pp=1, zero=0, recompute=0, m=4, extra=None):
    v = model_values(SHAPE, MOE) | (extra or {})
    v.update({s.B: 1, s.M: m, s.b: 2, s.EP: ep, s.DP: dp, s.TP: tp, s.PP: pp, s.Z: zero, s.R: recompute})
    return float(s.expand(expr).xreplace(v))


def test_model_states_by_hand():
    """No sharding: 2 + 2 + 12 bytes per parameter."""
    p_total = evaluate(memory.P_d + memory.P_x)
    states = evaluate(memory.parameters + memory.gradients + memory.optimizer)
    assert states == pytest.approx(16 * p_total)


def test_experts_divide_by_ep_and_their_optimizer_by_expert_dp():
    p_x = evaluate(memory.P_x)
    p_d = evaluate(memory.P_d)
    assert evaluate(memory.parameters, ep=8, dp=2) == pytest.approx(2 * (p_d + p_x / 8))
    # ZeRO-1: the dense optimizer state shards over EP*DP = 16 ranks, the experts' over DP = 2
    assert evaluate(memory.optimizer, ep=8, dp=2, zero=1) == pytest.approx(12 * (p_d / 16 + p_x / 8 / 2))


@pytest.mark.parametrize("term,stage", [(memory.optimizer, 1), (memory.gradients, 2), (memory.parameters, 3)])
def test_zero_stage_shards_its_state(term, stage):
    before, after = evaluate(term, dp=4, zero=stage - 1), evaluate(term, dp=4, zero=stage)
    assert after == pytest.approx(before / 4)


def test_recompute_and_pipeline_activations():
    full = evaluate(memory.activations)
    assert evaluate(memory.activations, recompute=1) < full / 5
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
    ring = 2 * 3 / 4 * 2 * p_d
    assert evaluate(comm.grad_dense_volume, ep=2, dp=2, zero=1) == pytest.approx(ring)
    assert evaluate(comm.grad_dense_volume, ep=2, dp=2, zero=2, m=4) == pytest.approx(ring * 5 / 2)
    assert evaluate(comm.grad_dense_volume, ep=2, dp=2, zero=3, m=4) == pytest.approx(ring * 12 / 2)


def test_step_time_terms_add_up_and_bubble_grows_with_pp():
    hw = {time_model.peak: 1e15, time_model.eta: 0.5, time_model.omega: 0.0, time_model.m_half: 0}
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
