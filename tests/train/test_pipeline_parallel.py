"""train.py of builds compiled with --pp 2: under torchrun (gloo, 2 processes) each gives the losses of the
same build on one process, with 1F1B and with interleaved 1F1B (two stages a rank); on 4 processes, PP2 x
EP2 gives the losses of EP2 on 2 and PP2 x DP2 those of DDP on 2 (the data a rank reads depends on its
data-parallel rank, which the stages of a pipeline share); too few micro-batches for the pipeline is one
line."""
import pytest

from moec.base.options import Options
from moec.driver.compiler import compile_model
from moec.runtime.training.progress import read_metrics
from tests.train.conftest import ROOT, TINY, run_train

# a pipeline keeps the compiled selection biases: so does the run it is compared with
STEPS = ["--steps", 10, "--grad-accum", 2, "--log-every", 1, "--eval-every", 0, "--ckpt-every", -1, "--bias-fit", 0, "--bias-refit", 0]


def _build(tmp_path_factory, name: str, layers: int, **plan):
    out = tmp_path_factory.mktemp("builds") / name
    options = Options(experts=4, topk=2, overrides={**TINY, "n_layer": layers}, verify=False, **plan)
    compile_model(str(ROOT / "examples" / "gpt.py"), str(out), options, log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def pp2_build(tmp_path_factory):
    return _build(tmp_path_factory, "gpt-moe-pp2", 2, pp=2)


@pytest.fixture(scope="module")
def pp2_dense_build(tmp_path_factory):
    """GPT's embedding and head are one weight under two names (model.py's TIED) on the first and last stage."""
    return _build(tmp_path_factory, "gpt-dense-pp2", 2, pp=2, dense=True)


@pytest.fixture(scope="module")
def pp2_interleaved_build(tmp_path_factory):
    return _build(tmp_path_factory, "gpt-moe-pp2i", 4, pp=2, pp_schedule="interleaved-1f1b")


def _train_records(build, run, nproc, *extra):
    r = run_train(build, *STEPS, *extra, run_dir=run, nproc=nproc, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return [x for x in read_metrics(run / "metrics.jsonl") if x["kind"] == "train"]


def _same_run(reference: list, got: list) -> None:
    assert [x["step"] for x in got] == [x["step"] for x in reference] == list(range(1, 11))
    for a, b in zip(reference, got):
        for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm"):
            assert (key in b) == (key in a) and b.get(key) == pytest.approx(a.get(key), rel=1e-5, abs=1e-5), \
                (a["step"], key)
        for la, lb in zip(a["expert_load"], b["expert_load"], strict=True):  # counts gathered over the stages
            assert lb == pytest.approx(la, rel=1e-9), a["step"]
    assert got[-1]["lm_loss"] < got[0]["lm_loss"]


@pytest.mark.parametrize("fixture", ["pp2_build", "pp2_interleaved_build", "pp2_dense_build"])
def test_pp2_gives_the_single_process_losses(fixture, request, tmp_path):
    build = request.getfixturevalue(fixture)
    stages = (build / "stages.py").read_text()
    assert "class Stage0(Model):" in stages and "self.h[0:1](" in stages  # a readable program per stage
    _same_run(_train_records(build, tmp_path / "one", 1), _train_records(build, tmp_path / "pp", 2))


@pytest.mark.parametrize("plan", [dict(ep=2), dict()], ids=["pp2xep2", "pp2xdp2"])
def test_pp2_on_four_processes_gives_the_losses_of_its_two_process_plan(plan, tmp_path_factory, tmp_path):
    """Each pipeline's stages read the data of its data-parallel rank: PP2 x EP2 on 4 processes reads what EP2
    reads on 2, PP2 x DP2 what DDP reads on 2; the same weights, so the same losses."""
    name = "-".join(f"{k}{v}" for k, v in plan.items())
    flat = _build(tmp_path_factory, f"gpt-moe-{name}", 2, **plan)
    piped = _build(tmp_path_factory, f"gpt-moe-pp2-{name}", 2, pp=2, **plan)
    small = ["--batch-size", 2]
    _same_run(_train_records(flat, tmp_path / "flat", 2, *small), _train_records(piped, tmp_path / "pp", 4, *small))


@pytest.mark.parametrize("schedule,layers,more", [("gpipe", 2, dict(first_dense=1)), ("zero-bubble", 4, {})])
def test_the_other_schedules_give_the_single_process_losses(schedule, layers, more, tmp_path_factory, tmp_path):
    """Shorter runs: GPipe, here with a first stage of one dense layer (no MoE losses, no expert counts), and
    the zero-bubble schedule (input and weight gradients apart, two stages a rank)."""
    build = _build(tmp_path_factory, f"gpt-moe-pp2-{schedule}", layers, pp=2, pp_schedule=schedule, **more)
    if more:
        assert "stage_output(x, stage=0)" in (build / "stages.py").read_text()
    runs = []
    for nproc, run in ((1, tmp_path / "one"), (2, tmp_path / "pp")):
        r = run_train(build, "--steps", 4, *STEPS[2:], run_dir=run, nproc=nproc, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append([x for x in read_metrics(run / "metrics.jsonl") if x["kind"] == "train"])
    one, pp = runs
    assert [x["step"] for x in pp] == [x["step"] for x in one] == [1, 2, 3, 4]
    for a, b in zip(one, pp):
        for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)


@pytest.mark.parametrize("args,message", [
    (["--grad-accum", 1], "--grad-accum 1: a pipeline of 2 ranks needs at least 2 micro-batches a step (the "
                          "micro-batches are the gradient-accumulation ones)"),
    (["--compile"], "--compile does not apply to pipeline stages yet: drop it, or recompile without --pp"),
])
def test_what_a_pipeline_does_not_run_is_one_line_before_training(pp2_build, tmp_path, args, message):
    r = run_train(pp2_build, "--steps", 1, *args, run_dir=tmp_path / "run", nproc=2, timeout=120)
    assert r.returncode != 0
    assert f"error: {message}" in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_pp2_run_resumes_on_one_process_and_back(pp2_build, tmp_path):
    """Stopped after 4 steps under PP2, resumed on one process to 6 and under PP2 again to 8: the losses of
    the run that stayed on one process (each checkpoint holds every parameter once, under its name)."""
    base = ["--grad-accum", 2, "--log-every", 1, "--eval-every", 0, "--bias-fit", 0, "--bias-refit", 0]

    def run(run_dir, nproc, steps, *more):
        r = run_train(pp2_build, *base, "--steps", steps, *more, run_dir=run_dir, nproc=nproc, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]

    for run_dir, plans in ((tmp_path / "one", (1, 1, 1)), (tmp_path / "moved", (2, 1, 2))):
        for i, (nproc, steps) in enumerate(zip(plans, (4, 6, 8))):  # each --steps reshapes the schedule alike
            run(run_dir, nproc, steps, *(["--resume"] if i else []))
    one, moved = ([x for x in read_metrics(d / "metrics.jsonl") if x["kind"] == "train"]
                  for d in (tmp_path / "one", tmp_path / "moved"))
    assert [x["step"] for x in moved] == [x["step"] for x in one] == list(range(1, 9))
    for a, b in zip(one, moved):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-5, abs=1e-5), a["step"]
