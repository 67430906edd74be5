"""Aux-loss-free balancing in train.py: the selection biases move once a step, by the slots of every
micro-batch of the step on every rank (gradient accumulation, EP=2 under torchrun with gloo), stay zero-mean,
and travel with checkpoints and the exported weights; a fresh run first fits them to a batch of its own data,
and each step then refits them to the router logits of its last micro-batch under the updated routers
(--bias-refit, on by default), reading nothing back to the host."""
import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from moec.base.errors import MoecError
from moec.base.options import Options
from moec.driver.compiler import compile_model
from moec.runtime import TokenData, load_build, load_tokens
from moec.runtime.distributed.checkpoint import load_state
from moec.runtime.ops.routing import expert_counts, select_experts
from moec.runtime.training import balance as balance_module
from moec.runtime.training.balance import ExpertBias
from tests.train.conftest import ROOT, TINY, run_train

RATE = 0.01
BIAS = ("h.0.mlp.moe.router.bias", "h.1.mlp.moe.router.bias")


def _build(tmp_path_factory, name, **options):
    out = tmp_path_factory.mktemp("builds") / name
    o = Options(experts=4, topk=2, overrides=TINY, verify=False, expert_bias_rate=RATE, **options)
    compile_model(str(ROOT / "examples" / "gpt.py"), str(out), o, log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def bias_build(tmp_path_factory):
    return _build(tmp_path_factory, "gpt-bias")


@pytest.fixture(scope="module")
def bias_ep2_build(tmp_path_factory):
    return _build(tmp_path_factory, "gpt-bias-ep2", ep=2)


def _model(build):
    spec = importlib.util.spec_from_file_location(f"bias_model_{build.name}", build / "model.py")
    sys.path.insert(0, str(build))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(build))
    return load_build(module.Model, build)


def _fit(model, data, sequences: int, world: int) -> None:
    """What a fresh train.py does first with --grad-accum 2: fit the biases to the first micro-batch (half of
    `sequences`) of the batch no step reads, on every rank, their counts summed."""
    batches = [data.batch("train", -1, sequences, rank, world, 2)[0].chunk(2)[0] for rank in range(world)]

    def loss_of(inputs, targets):  # every rank's forward at once, as the all-reduce would add them up
        outs = [model(b)["expert_counts"] for b in batches]
        return None, {"expert_counts": [sum(layer) for layer in zip(*outs)]}

    before, after = ExpertBias(model, list(BIAS), RATE).calibrate(model, loss_of, None, None)
    assert after <= before


def _after_one_step(build, sequences: int, world: int) -> dict:
    """The biases train.py should hold after step 1: the compiled ones fitted to the start batch, then moved
    by the slots of all the step's `sequences` per rank (32 tokens each, the run's --seed 0 data) summed over
    the `world` ranks."""
    model = _model(build)
    data = TokenData(load_tokens(None), 32, 0.05, 0)
    _fit(model, data, sequences, world)
    counts = None
    with torch.no_grad():
        for rank in range(world):
            out = model(data.batch("train", 0, sequences, rank, world, 2)[0])["expert_counts"]
            counts = out if counts is None else [a + b for a, b in zip(counts, out)]
    want = {}
    for name, c in zip(BIAS, counts):
        b = model.get_buffer(name) + RATE * torch.sign(c.float().mean() - c.float())
        want[name] = b - b.mean()
    return want


def test_the_step_counts_every_micro_batch_and_every_rank_once():
    model = torch.nn.Module()
    model.register_buffer("b", torch.tensor([0.0, 0.0, 0.0, 0.0]))
    bias = ExpertBias(model, ["b"], 0.5)
    bias.add({"expert_counts": [torch.tensor([4, 0, 2, 2])]})
    bias.add({"expert_counts": [torch.tensor([0, 4, 3, 1])]})  # sum [4, 4, 5, 3], mean 4
    bias.step()
    assert torch.equal(model.b, torch.tensor([0.0, 0.0, -0.5, 0.5]))
    bias.step()  # nothing counted since: nothing moves
    assert torch.equal(model.b, torch.tensor([0.0, 0.0, -0.5, 0.5]))
    with pytest.raises(RuntimeError, match="routes 1 MoE layers and config.json names 0"):
        ExpertBias(model, [], 0.5).add({"expert_counts": [torch.tensor([1, 2, 3, 4])]})  # a build from before
    model.register_buffer("c", torch.zeros(2))
    skipping = ExpertBias(model, [None, "c"], 1.0)  # a hash layer first: no bias of its own
    skipping.add({"expert_counts": [torch.tensor([9, 0, 0, 0]), torch.tensor([1, 3])]})
    skipping.step()
    assert torch.equal(model.c, torch.tensor([1.0, -1.0]))


def test_grad_accum_moves_the_bias_by_the_whole_step(bias_build, tmp_path):
    compiled = load_file(str(bias_build / "weights.safetensors"))
    assert all(compiled[n].abs().sum() > 0 for n in BIAS)  # calibrated at compile time
    r = run_train(bias_build, "--steps", 1, "--grad-accum", 2, "--eval-every", 0, "--bias-refit", 0,
                  run_dir=tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(str(tmp_path / "run" / "final.safetensors"))
    for name, want in _after_one_step(bias_build, 8, 1).items():
        assert torch.allclose(got[name], want, atol=1e-6), name
        assert abs(got[name].sum()) < 1e-6


def test_ep2_ranks_move_the_bias_by_the_global_counts(bias_ep2_build, tmp_path):
    run = tmp_path / "run"
    r = run_train(bias_ep2_build, "--steps", 1, "--grad-accum", 2, "--eval-every", 0, "--bias-refit", 0,
                  run_dir=run, nproc=2, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    state = {f"model.{n}": torch.zeros(4) for n in BIAS}
    load_state(state, run / "checkpoints" / "step_00000001")
    for name, want in _after_one_step(bias_ep2_build, 8, 2).items():
        assert torch.allclose(state[f"model.{name}"], want, atol=1e-6), name


def test_a_resumed_run_continues_from_the_saved_bias(bias_build, tmp_path):
    whole = run_train(bias_build, "--steps", 3, "--eval-every", 0, run_dir=tmp_path / "whole")
    part = run_train(bias_build, "--steps", 2, "--eval-every", 0, run_dir=tmp_path / "part")
    resumed = run_train(bias_build, "--steps", 3, "--eval-every", 0, "--resume", run_dir=tmp_path / "part")
    for r in (whole, part, resumed):
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(str(tmp_path / "whole" / "final.safetensors")), load_file(str(tmp_path / "part" / "final.safetensors"))
    compiled = load_file(str(bias_build / "weights.safetensors"))
    for name in BIAS:
        assert torch.equal(a[name], b[name]) and not torch.equal(a[name], compiled[name])


def test_fitting_the_biases_to_a_batch_evens_its_load():
    torch.manual_seed(0)
    E, T = 8, 512
    centres = torch.randn(E) * 0.3 + torch.linspace(0, 2, E)  # experts the router favours unevenly
    scores = torch.softmax(centres + 0.2 * torch.randn(T, E), -1)
    model = torch.nn.Module()
    model.register_buffer("b", torch.zeros(E))
    seen = []

    def loss_of(inputs, targets):
        seen.append(model.training)
        chosen = torch.topk(scores + model.b, 2).indices.flatten()
        return None, {"expert_counts": [torch.bincount(chosen, minlength=E)]}

    model.train()
    before, after = ExpertBias(model, ["b"], RATE).calibrate(model, loss_of, None, None)
    counts = loss_of(None, None)[1]["expert_counts"][0].float()
    assert before > 3 and after == counts.max() / counts.mean() < 1.1  # the kept biases are the best seen
    assert abs(model.b.sum()) < 1e-6 and not any(seen[:-1]) and model.training  # eval while fitting


class DriftingRouter(torch.nn.Module):
    """A top-2 router over E experts whose logits move each step the way training moves a router: every
    expert's preference drifts at its own steady rate, and each step brings new tokens. The router's input
    h is [noise, 1] and its weight [I, drift * steps * direction], so logits = h @ weight^T = noise + drift."""

    def __init__(self, E=8, T=1024, drift=0.02):
        super().__init__()
        self.E, self.T, self.drift = E, T, drift
        self.router = torch.nn.Module()
        self.router.register_buffer("bias", torch.zeros(E))
        self.router.weight = torch.nn.Parameter(torch.cat([torch.eye(E), torch.zeros(E, 1)], 1))
        self.direction = torch.randn(E, generator=torch.Generator().manual_seed(1))

    def advance(self):
        """The optimizer step: the router's preferences move on."""
        with torch.no_grad():
            self.router.weight[:, -1] += self.drift * self.direction

    def inputs(self, step):
        noise = 0.3 * torch.randn(self.T, self.E, generator=torch.Generator().manual_seed(100 + step))
        return torch.cat([noise, torch.ones(self.T, 1)], 1)

    def forward(self, step):
        logits = F.linear(self.inputs(step), self.router.weight).detach()
        chosen = torch.topk(logits.softmax(-1) + self.router.bias, 2).indices
        return {"expert_counts": [expert_counts(chosen, self.E)], "router_inputs": [self.inputs(step)]}


def _load(counts):
    return (counts.max() / counts.float().mean()).item()


def _train_drifting(refit: int, forward: bool = False) -> list:
    """The worst max/mean load of each of 40 steps: route the step's tokens; the optimizer step moves the
    router; then move the bias by the tokens' counts (the --expert-bias-rate step) and refit it to their
    inputs under the moved router, those of their forward or, with `forward`, of one more forward."""
    model = DriftingRouter()
    bias = ExpertBias(model, ["router.bias"], 1e-3, topk=2, refit=refit)
    loads = []
    for step in range(40):
        out = model(step)
        loads.append(_load(out["expert_counts"][0]))
        bias.add(out)
        model.advance()
        if forward:
            bias.rescore(model, lambda inputs, targets: (None, model(inputs)), step, None)
        bias.step()
    return loads


def test_refitting_each_step_to_the_moved_router_keeps_up_with_it():
    sign, refit, forward = _train_drifting(0), _train_drifting(12), _train_drifting(12, forward=True)
    assert max(sign[20:]) > 1.5  # a fixed 1e-3 step a step does not follow the drift
    assert max(refit[1:]) < 1.3  # the first step routes before any refit
    assert refit == forward  # the inputs do not move here: scoring them again is the forward's work


def test_rescoring_records_an_eval_forward_of_the_moved_model():
    model = DriftingRouter()
    bias = ExpertBias(model, ["router.bias"], 1e-3, topk=2, refit=12)
    bias.add(model(0))
    modes = []
    model.train()
    bias.rescore(model, lambda inputs, targets: (modes.append(model.training), model(inputs)), 5, None)
    assert torch.equal(bias.inputs[0], model.inputs(5)) and modes == [False] and model.training


class RouterMatmuls(TorchDispatchMode):
    """Records the output of every matmul whose second operand is one of `weights` (transposed): the
    router logits a forward computes."""

    def __init__(self, weights):
        super().__init__()
        self.pointers, self.logits = {w.data_ptr(): i for i, w in enumerate(weights)}, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            i = self.pointers.get(args[-1].data_ptr())
            if i is not None:
                self.logits[i] = out.clone()
        return out


def _step_the_routers(model, tokens, lr=3e-3):
    """One AdamW step of the routers alone on the LM loss of `tokens`: the layers below each router, and so
    the first layer's router input, stay as they were."""
    out = model(tokens[:, :-1])
    loss = F.cross_entropy(out["logits"].flatten(0, 1), tokens[:, 1:].flatten()) + out["aux_loss"]
    routers = [p for n, p in model.named_parameters() if n.endswith("router.weight")]
    loss.backward(inputs=routers)
    torch.optim.AdamW(routers, lr=lr).step()


def test_the_refit_scores_the_kept_inputs_as_a_forward_of_the_updated_router(bias_build):
    model = _model(bias_build).eval()
    tokens = TokenData(load_tokens(None), 32, 0.05, 0).batch("train", 0, 8, 0, 1)[0]
    bias = ExpertBias(model, list(BIAS), RATE, topk=2, refit=12)
    with torch.no_grad(), RouterMatmuls(bias.weights) as seen:
        bias.add(model(tokens))
    before = seen.logits
    assert [torch.equal(x, y) for x, y in zip(bias.router_logits(), before.values())] == [True, True]
    _step_the_routers(model, tokens)
    with torch.no_grad(), RouterMatmuls(bias.weights) as seen:
        out = model(tokens)
    # the first layer's input is the same as before the step, and the updated router scores it differently
    assert torch.equal(bias.router_logits()[0], seen.logits[0]) and not torch.equal(before[0], seen.logits[0])
    bias.add(out)  # every layer's input now
    assert [torch.equal(x, y) for x, y in zip(bias.router_logits(), seen.logits.values())] == [True, True]


def test_the_refit_evens_the_load_the_updated_routers_give(bias_build):
    """Fitted to the micro-batch's inputs under the updated routers, the biases route that micro-batch after
    the step at least as evenly as biases fitted to the logits its forward computed before the step."""
    model = _model(bias_build)
    tokens = TokenData(load_tokens(None), 32, 0.05, 0).batch("train", 0, 16, 0, 1)[0]
    bias = ExpertBias(model, list(BIAS), RATE, topk=2, refit=12)
    with torch.no_grad():
        bias.add(model(tokens[:, :-1]))
    before, start = bias.router_logits(), [b.clone() for b in bias.biases]
    _step_the_routers(model, tokens)

    def load_after_the_step(logits):
        for b, s in zip(bias.biases, start):
            b.copy_(s)
        bias.refit(logits, 12)
        with torch.no_grad():
            return [_load(c) for c in model(tokens[:, :-1])["expert_counts"]]

    stale = load_after_the_step(before)
    for b, s in zip(bias.biases, start):
        b.copy_(s)
    bias.step()  # the rate's step by the micro-batch's slots, then the refit to the updated routers
    assert bias.inputs is None  # released with the step
    with torch.no_grad():
        moved = [_load(c) for c in model(tokens[:, :-1])["expert_counts"]]
    assert max(stale) > 1.05  # the routers moved enough to unbalance the stale fit
    assert all(m <= s for m, s in zip(moved, stale)), (moved, stale)
    assert all(abs(b.sum()) < 1e-5 for b in bias.biases)


def _skewed(T, E, fine=1, seed=0):
    """Router logits [T, E*fine] that favour some experts far more than others; with fine > 1 each expert is
    fine segments with equal logits (an upcycled fine-grained layer), which only a bias can tell apart."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.linspace(0, 3, E) + 0.5 * torch.randn(T, E, generator=g)
    return logits.repeat_interleave(fine, dim=-1)


@pytest.mark.parametrize("E, K, fine", [(8, 2, 1), (8, 8, 8)])
def test_the_refit_evens_top_k_over_skewed_scores(E, K, fine):
    logits = _skewed(2048, E, fine)
    model = torch.nn.Module()
    model.register_buffer("b", torch.zeros(E * fine))
    worst = ExpertBias(model, ["b"], 1e-3, topk=K).refit([logits], 12)
    load = lambda b: _load(expert_counts(select_experts(logits.softmax(-1), K, b, 1, 1), E * fine))
    assert load(torch.zeros(E * fine)) > 2.5
    assert load(model.b) == pytest.approx(worst.item()) and worst < 1.1  # what it returns is what it keeps
    assert abs(model.b.sum()) < 1e-5


def _identity_router(E):
    """A router whose logits are its inputs (weight I), with a zero selection bias."""
    model = torch.nn.Module()
    model.router = torch.nn.Module()
    model.router.register_buffer("bias", torch.zeros(E))
    model.router.weight = torch.nn.Parameter(torch.eye(E))
    return model


def test_the_step_counts_every_micro_batch_once_and_refits_to_the_last():
    model = _identity_router(8)
    bias = ExpertBias(model, ["router.bias"], 1e-3, topk=2, refit=12)
    first, last = _skewed(512, 8, seed=1), _skewed(512, 8, seed=2).flip(-1)  # opposite skews
    for logits in (first, last):
        counts = expert_counts(select_experts(logits.softmax(-1), 2, model.router.bias, 1, 1), 8)
        bias.add({"expert_counts": [counts], "router_inputs": [logits]})
    bias.step()
    alone = torch.nn.Module()
    alone.register_buffer("b", torch.zeros(8))  # the summed counts of opposite skews are about even
    gamma = ExpertBias(alone, ["b"], 1e-3)
    for logits in (first, last):
        gamma.add({"expert_counts": [expert_counts(select_experts(logits.softmax(-1), 2, None, 1, 1), 8)]})
    gamma.step()  # the refit starts from the rate's step
    ExpertBias(alone, ["b"], 1e-3, topk=2).refit([last], 12)
    assert torch.equal(model.router.bias, alone.b)
    assert abs(model.router.bias.sum()) < 1e-5
    moved = model.router.bias.clone()
    bias.step()  # nothing recorded since: nothing moves
    assert torch.equal(model.router.bias, moved)
    with pytest.raises(MoecError, match="returns router_logits.*recompile the build"):  # a build from before
        bias.add({"expert_counts": [counts], "router_logits": [logits]})


def test_ranks_holding_the_same_tokens_refit_as_one(monkeypatch):
    """Two data-parallel ranks with identical tokens: the loads sum and the moves average to what one rank
    alone fits (a sum of the moves would move twice as far)."""
    logits = _skewed(1024, 8)
    one = torch.nn.Module()
    one.register_buffer("b", torch.zeros(8))
    ExpertBias(one, ["b"], 1e-3, topk=2).refit([logits], 12)
    two = torch.nn.Module()
    two.register_buffer("b", torch.zeros(8))
    monkeypatch.setattr(balance_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(balance_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(balance_module.dist, "all_reduce", lambda t: t.mul_(2))  # the other rank's, the same
    ExpertBias(two, ["b"], 1e-3, topk=2).refit([logits], 12)
    assert torch.allclose(one.b, two.b) and not torch.equal(one.b, torch.zeros(8))


def test_the_refit_reads_nothing_back_to_the_host():
    """Run on fake tensors (no data): .item(), a data-dependent shape or a branch on a value would raise."""
    with FakeTensorMode():
        model = DriftingRouter(T=64)
        bias = ExpertBias(model, ["router.bias"], 1e-3, topk=2, refit=3)
        bias.add(model(0))
        model.advance()
        scores = bias.router_logits()
        bias.step()  # the rate's step, the inputs scored by the moved router, the refit
        worst = bias.refit(scores, 3)
    assert worst.shape == (1,) and scores[0].shape == (64, 8)


def test_a_pipeline_refuses_the_refit_forward():
    """Its stages hold some of the layers each: no stage can score the micro-batch again alone."""
    from types import SimpleNamespace

    from moec.runtime.training.pipeline import Pipeline
    pipeline = Pipeline.__new__(Pipeline)
    pipeline.schedule = SimpleNamespace(eval=None)
    args = SimpleNamespace(val_fraction=0, compile=False, cuda_graphs=False, debug_nan_at_step=None,
                           bias_refit_forward=True)
    with pytest.raises(MoecError, match="--bias-refit-forward does not apply to pipeline stages"):
        pipeline.check_flags(args)
