"""train.py of builds compiled with --pp 2: under torchrun (gloo, 2 processes) each gives the losses of the
same build on one process, with 1F1B and with interleaved 1F1B (two stages a rank); too few micro-batches
for the pipeline is one line."""
import pytest

from moec.base.options import Options
from moec.driver.compiler import compile_model
from moec.runtime.training.progress import read_metrics
from tests.train.conftest import ROOT, TINY, run_train

STEPS = ["--steps", 10, "--grad-accum", 2, "--log-every", 1, "--eval-every", 0, "--ckpt-every", -1]


def _build(tmp_path_factory, name: str, layers: int, **plan):
    out = tmp_path_factory.mktemp("builds") / name
    options = Options(experts=4, topk=2, overrides={**TINY, "n_layer": layers}, verify=False, **plan)
    compile_model(str(ROOT / "examples" / "gpt.py"), str(out), options, log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def pp2_build(tmp_path_factory):
    return _build(tmp_path_factory, "gpt-moe-pp2", 2, pp=2)


@pytest.fixture(scope="module")
def pp2_interleaved_build(tmp_path_factory):
    return _build(tmp_path_factory, "gpt-moe-pp2i", 4, pp=2, pp_schedule="interleaved-1f1b")


def _train_records(build, run, nproc):
    r = run_train(build, *STEPS, run_dir=run, nproc=nproc, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return [x for x in read_metrics(run / "metrics.jsonl") if x["kind"] == "train"]


@pytest.mark.parametrize("fixture", ["pp2_build", "pp2_interleaved_build"])
def test_pp2_gives_the_single_process_losses(fixture, request, tmp_path):
    build = request.getfixturevalue(fixture)
    stages = (build / "stages.py").read_text()
    assert "class Stage0(Model):" in stages and "self.h[0:1](" in stages  # a readable program per stage
    one = _train_records(build, tmp_path / "one", 1)
    pp = _train_records(build, tmp_path / "pp", 2)
    assert [x["step"] for x in pp] == list(range(1, 11))
    for a, b in zip(one, pp):
        for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)
        assert b["expert_load"] == a["expert_load"]  # every layer's counts, gathered over the stages
    assert pp[-1]["lm_loss"] < pp[0]["lm_loss"]


def test_fewer_micro_batches_than_stages_is_one_line(pp2_build, tmp_path):
    r = run_train(pp2_build, "--steps", 1, "--grad-accum", 1, run_dir=tmp_path / "run", nproc=2, timeout=120)
    assert r.returncode != 0
    assert ("error: --grad-accum 1: a pipeline of 2 ranks needs at least 2 micro-batches a step (the micro-batches "
            "are the gradient-accumulation ones)") in r.stderr
