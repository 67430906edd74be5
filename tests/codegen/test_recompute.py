"""--recompute: model.py's layer loop calls each layer through moec.runtime.recompute, which keeps only
the layer's inputs for backward and runs its forward again there; training computes what it computes
without recomputation."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moec.base.errors import MoecError
from moec.base.options import Options
from moec.driver.compiler import compile_model
from moec.runtime.kernels.generated import import_file
from moec.runtime import load_build
from moec.runtime.training import pipeline
from tests.hf_checkpoints import load_program

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recompute")
    out = {}
    for name, recompute in (("plain", False), ("recompute", True)):
        out[name] = tmp / name
        compile_model(str(ROOT / "examples" / "gpt.py"), str(out[name]),
                      Options(experts=4, topk=2, overrides=TINY, recompute=recompute, verify=False).validate(),
                      log=lambda s: None)
    return out


def _tokens(step):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, TINY["vocab_size"], (2, 17), generator=g)


def _loss(model, ids):
    out = model(ids[:, :-1])
    lm = F.cross_entropy(out["logits"].flatten(0, 1), ids[:, 1:].flatten())
    return lm + out["aux_loss"] + out["z_loss"], out


def test_the_loop_recomputes_only_in_a_recompute_build(builds):
    plain, recompute = ((builds[k] / "model.py").read_text() for k in ("plain", "recompute"))
    assert "RECOMPUTE = True" in recompute and "moec.runtime.recompute(layer, x, batch, seq)" in recompute
    assert "recompute(" not in plain.replace("recompute=False", "")


def test_training_steps_match_the_build_without_recompute(builds):
    torch.manual_seed(0)
    models = {k: load_program(b).train() for k, b in builds.items()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-2) for k, m in models.items()}
    for step in range(3):
        ids, seen = _tokens(step), {}
        for k, m in models.items():
            opts[k].zero_grad()
            loss, out = _loss(m, ids)
            loss.backward()
            seen[k] = (loss.detach(), out, {n: p.grad.clone() for n, p in m.named_parameters()})
            opts[k].step()
        (l0, o0, g0), (l1, o1, g1) = seen["plain"], seen["recompute"]
        torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
        assert g0.keys() == g1.keys()
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=f"step {step}: grad of {n}")
        # the detached side outputs are the forward's values: the training loop's expert counts and bias refit
        for key in ("expert_counts", "router_inputs"):
            for a, b in zip(o0[key], o1[key], strict=True):
                torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert any(n.endswith("router.weight") and g.abs().sum() > 0 for n, g in g1.items())


def _calls_and_saved(model, grad=True):
    """(the first layer's forward calls during one forward and backward, the bytes autograd saved outside
    checkpointed regions)."""
    calls, saved = [0], [0]
    handle = model.h[0].register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.set_grad_enabled(grad):
            loss, _ = _loss(model, _tokens(0))
        if grad:
            loss.backward()
    finally:
        handle.remove()
    return calls[0], saved[0]


def test_backward_runs_each_layer_again_and_keeps_fewer_activations(builds):
    plain, recompute = (load_program(builds[k]).train() for k in ("plain", "recompute"))
    calls0, saved0 = _calls_and_saved(plain)
    calls1, saved1 = _calls_and_saved(recompute)
    assert (calls0, calls1) == (1, 2)  # the layer's forward ran again in backward
    assert saved1 < saved0 / 2, (saved1, saved0)  # what the layers' ops would have saved is not kept


def test_eval_and_no_grad_run_the_layers_plain(builds):
    model = load_program(builds["recompute"])
    assert _calls_and_saved(model.eval())[0] == 1
    assert _calls_and_saved(model.train(), grad=False)[0] == 1
    kept = _calls_and_saved(model.eval())[1]  # grad but eval mode: the layers keep their activations
    assert kept > 2 * _calls_and_saved(model.train())[1]


def test_pipeline_stages_recompute_their_layers(tmp_path):
    """stages.py runs model.py's loop over a slice of the layers, so a stage recomputes them as model.py does;
    RECOMPUTE = False turns it off, with the same gradients."""
    out = tmp_path / "pp"
    compile_model(str(ROOT / "examples" / "gpt.py"), str(out),
                  Options(experts=4, topk=2, overrides=TINY, recompute=True, pp=2, verify=False).validate(),
                  log=lambda s: None)
    saved = sys.modules.get("model")
    try:
        program = import_file("model", out / "model.py")
        stages = import_file(f"recompute_stages_{id(out)}", out / "stages.py")
    finally:
        sys.modules.pop("model") if saved is None else sys.modules.__setitem__("model", saved)
    model = load_build(program.Model, out).train()
    grads, calls = {}, {}
    for flag in (True, False):
        program.RECOMPUTE = flag
        counts = [0, 0]
        hooks = [model.h[i].register_forward_hook(lambda *a, i=i: counts.__setitem__(i, counts[i] + 1))
                 for i in range(2)]
        x = _tokens(0)[:, :-1]
        for cls in stages.STAGES:
            x = pipeline.restrict(model, cls.READS, cls.LAYERS, cls)(x)
        model.zero_grad()
        x.square().mean().backward()
        pipeline.clear_records()
        for h in hooks:
            h.remove()
        calls[flag] = counts
        grads[flag] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert calls == {True: [2, 2], False: [1, 1]}
    assert grads[True].keys() == grads[False].keys() and any(".router." in n for n in grads[True])
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-7, msg=n)


def test_torch_compile_traces_the_recomputed_layers_without_a_graph_break(builds):
    """train.py compiles the model on a GPU: the checkpointed layers trace into one graph (fullgraph), with
    the gradients of the eager plain build."""
    plain, recompute = (load_program(builds[k]).train() for k in ("plain", "recompute"))
    ids, grads = _tokens(0), []
    for model, run in ((plain, plain), (recompute, torch.compile(recompute, backend="aot_eager", fullgraph=True))):
        _loss(run, ids)[0].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_a_model_whose_layers_are_not_a_loop_is_refused_in_one_line():
    """One norm shared by both blocks: model.py is written as one flat forward, which cannot recompute."""
    from moec.codegen.program import model_source
    from moec.driver.capture import capture
    from tests.models import D, Gated, Residual

    gm = capture(Residual(Gated), (torch.randn(2, 4, D),))
    assert "def forward" in model_source(gm, "flat")  # without --recompute it is written
    with pytest.raises(MoecError, match="could not be cut out as a loop: compile without --recompute"):
        model_source(gm, "flat", recompute=True)
