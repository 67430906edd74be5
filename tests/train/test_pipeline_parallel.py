"""train.py of builds compiled with --pp 2: under torchrun (gloo, 2 processes) each gives the losses of the
same build on one process, with 1F1B and with interleaved 1F1B (two stages a rank); on 4 processes, PP2 x
EP2 gives them too and PP2 x DP2 those of DDP on 2 (the stages of a pipeline read their data-parallel rank's
share of the global batch), PP2 x TP2 gives them too (each stage's linears split over its TP group) and saves
the split weights at their global shapes, with the same collectives on every rank of a group and a receive for
each send, and under PP2 x EP2 one EP rank of the first stage gets no token; PP2 x DP2 with --zero (ZeRO-1)
gives them too, and its sharded checkpoint resumes on one process; a run resumes from PP2 x EP2 to EP4 to one
process and back; too few micro-batches for the pipeline, and --fsdp on a pipeline, are one line."""
import shutil

import pytest
from safetensors.torch import load_file

from moec.base.options import Options
from moec.driver.compiler import compile_model
from moec.runtime.distributed.checkpoint import read_metadata
from moec.runtime.training.checkpoint import read_weights
from moec.runtime.training.pipeline import SPLIT_BACKWARD, splits_custom_functions
from moec.runtime.training.progress import read_metrics
from tests.train.conftest import ROOT, TINY, collectives, run_train, starve_experts

# a pipeline keeps the compiled selection biases: so does the run it is compared with
STEPS = ["--steps", 10, "--grad-accum", 2, "--log-every", 1, "--eval-every", 0, "--ckpt-every", -1, "--bias-fit", 0, "--bias-refit", 0]


def _build(tmp_path_factory, name: str, layers: int, model: str = "gpt.py", **plan):
    out = tmp_path_factory.mktemp("builds") / name
    overrides = {**TINY, "n_layer": layers} if model == "gpt.py" else {"n_layers": layers}
    options = Options(experts=4, topk=2, overrides=overrides, verify=False, **plan)
    compile_model(str(ROOT / "examples" / model), str(out), options, log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def pp2_build(tmp_path_factory):
    return _build(tmp_path_factory, "gpt-moe-pp2", 2, pp=2)


@pytest.fixture(scope="module")
def pp2_ep2_build(tmp_path_factory):
    """Layer 0 (stage 0) sends every token to experts 0 and 1: experts 2 and 3, all that its EP rank 1 holds,
    get none, and that rank still takes part in every all-to-all."""
    build = _build(tmp_path_factory, "gpt-moe-pp2-ep2", 2, pp=2, ep=2)
    starve_experts(build, 0, [0, 1])
    return build


@pytest.fixture(scope="module")
def pp2_dense_build(tmp_path_factory):
    """GPT's embedding and head are one weight under two names (model.py's TIED) on the first and last stage."""
    return _build(tmp_path_factory, "gpt-dense-pp2", 2, pp=2, dense=True)


@pytest.fixture(scope="module")
def pp2_tp2_build(tmp_path_factory):
    return _build(tmp_path_factory, "gpt-dense-pp2-tp2", 2, pp=2, tp=2, dense=True)


@pytest.fixture(scope="module")
def pp2_interleaved_build(tmp_path_factory):
    return _build(tmp_path_factory, "gpt-moe-pp2i", 4, pp=2, pp_schedule="interleaved-1f1b")


def _train_records(build, run, nproc, *extra):
    r = run_train(build, *STEPS, *extra, run_dir=run, nproc=nproc, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return [x for x in read_metrics(run / "metrics.jsonl") if x["kind"] == "train"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """one_process(build): the train records of build's 10 steps on one process, run once a module."""
    done = {}

    def run(build):
        if build not in done:
            done[build] = _train_records(build, tmp_path_factory.mktemp("one"), 1)
        return done[build]
    return run


def _same_run(reference: list, got: list, data_ranks: int = 1, resumed_at: int = 0) -> None:
    """data_ranks: the pipelines of `got`, against one process's `reference` (else 1). Each rank of a pipeline
    holds every stage's expert counts and expert_load is their sum over all ranks per rank: 1/data_ranks of
    one process's on the same batch. resumed_at: `got` is a run resumed after that step."""
    reference = reference[resumed_at:]
    assert [x["step"] for x in got] == [x["step"] for x in reference] == list(range(resumed_at + 1, 11))
    for a, b in zip(reference, got):
        for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm"):
            assert (key in b) == (key in a) and b.get(key) == pytest.approx(a.get(key), rel=1e-5, abs=1e-5), \
                (a["step"], key)
        for la, lb in zip(a["expert_load"], b["expert_load"], strict=True):  # counts gathered over the stages
            lb = {**lb, "max": lb["max"] * data_ranks, "mean": lb["mean"] * data_ranks}
            assert lb == pytest.approx(la, rel=1e-9), a["step"]
    assert got[-1]["lm_loss"] < got[0]["lm_loss"]


@pytest.mark.parametrize("fixture", ["pp2_build", "pp2_interleaved_build", "pp2_dense_build"])
def test_pp2_gives_the_single_process_losses(fixture, request, one_process, tmp_path):
    build = request.getfixturevalue(fixture)
    stages = (build / "stages.py").read_text()
    assert "class Stage0(Model):" in stages and "self.h[0:1](" in stages  # a readable program per stage
    _same_run(one_process(build), _train_records(build, tmp_path / "pp", 2))


@pytest.mark.parametrize("fixture,zero", [("pp2_ep2_build", False), ("pp2_build", False), ("pp2_tp2_build", False),
                                          ("pp2_dense_build", True)],
                         ids=["pp2xep2", "pp2xdp2", "pp2xtp2", "pp2xdp2-zero1"])
def test_pp2_on_four_processes_gives_the_losses_of_one_process_or_of_ddp(fixture, zero, request, one_process,
                                                                          tmp_path_factory, tmp_path):
    """Two pipelines, whose stages read the share of their data-parallel rank, half of each micro-batch of the
    step's 8 sequences. PP2 x EP2 gives the losses of one process reading all 8: an EP build's balance loss
    counts the experts' slots over every data-parallel rank. PP2 x DP2, whose balance loss counts each rank's
    own, gives those of DDP on 2 processes reading the same shares. PP2 x TP2 (a dense build) is one pipeline
    whose stages are TP groups (ranks 0, 1 and 2, 3), TP rank t of stage 0 sending to TP rank t of stage 1: one
    process's losses and gradient norms (the split weights' squared norms summed over each TP group).
    PP2 x DP2 with --zero (ZeRO-1, a dense build: no balance loss, so one process's losses; its embedding and
    head, one weight, on both stages) shards each stage's optimizer state over the ranks running that stage
    and broadcasts the updates there; its checkpoint after step 5, each rank's shard under the parameters'
    names, resumes on one process with the losses of one process's steps 6-10."""
    build = request.getfixturevalue(fixture)
    tp = fixture == "pp2_tp2_build"  # one pipeline, each stage's TP group reading all the step's 8 sequences
    got = _train_records(build, tmp_path / "pp", 4, "--batch-size", 4 if tp else 2, "--debug-collectives",
                         *(["--ckpt-every", 0] if tp else []),  # tp: a checkpoint after the last step
                         *(["--zero", "--ckpt-every", 5] if zero else []))
    ops, links = collectives(tmp_path / "pp", 4)
    assert links == {(0, 2), (2, 0), (1, 3), (3, 1)}  # within each pipeline (ranks 0, 2 and 1, 3), not across
    issued = {"all_reduce", "all_to_all_single"} if fixture == "pp2_ep2_build" else {"all_reduce"}
    assert issued <= ops[frozenset({0, 1})] and issued <= ops[frozenset({2, 3})]  # each stage's EP or DP ranks
    # ZeRO's broadcasts of the updated shards, on each stage's data group only
    assert {g for g, o in ops.items() if "broadcast" in o} == ({frozenset({0, 1}), frozenset({2, 3})} if zero else set())
    if zero:
        reference = one_process(build)
        _same_run(reference, got)
        moved = tmp_path / "resumed" / "checkpoints" / "step_00000005"
        shutil.copytree(tmp_path / "pp" / "checkpoints" / "step_00000005", moved)
        _same_run(reference, _train_records(build, tmp_path / "resumed", 1, "--resume"), resumed_at=5)
    elif tp:
        _same_run(one_process(build), got)
        step10 = tmp_path / "pp" / "checkpoints" / "step_00000010"
        saved = read_metadata(step10).state_dict_metadata
        for layer in (0, 1):  # one on each stage, each TP slice of its q, k and v once
            chunks = saved[f"model.h.{layer}.attn.c_attn.weight"].chunks
            assert sorted(list(c.sizes) for c in chunks) == [[3, 16, 32]] * 2, layer
        assert {n: t.shape for n, t in read_weights(step10).items()} == \
            {n: t.shape for n, t in load_file(build / "weights.safetensors").items()}
    elif fixture == "pp2_ep2_build":
        reference = one_process(build)
        # two experts take every token: the slots' spread over four experts is as wide as it gets
        assert all(x["expert_load"][0]["cv"] == pytest.approx(1.0) for x in reference)
        _same_run(reference, got, data_ranks=2)
    else:
        ddp = _build(tmp_path_factory, "gpt-moe", 2)
        _same_run(_train_records(ddp, tmp_path / "ddp", 2, "--batch-size", 2), got)


@pytest.mark.parametrize("schedule,layers,more", [("gpipe", 2, dict(first_dense=1)), ("zero-bubble", 4, {}),
                                                  ("dualpipev", 4, {})])
def test_the_other_schedules_give_the_single_process_losses(schedule, layers, more, tmp_path_factory, tmp_path):
    """Shorter runs: GPipe, here with a first stage of one dense layer (no MoE losses, no expert counts), the
    zero-bubble schedule (input and weight gradients apart, two stages a rank) and DualPipeV (two stages a rank
    in a V: a Llama, since GPT's tied embedding and head, both on rank 0 there, are refused in one line); the
    last two a torch that cannot split a custom autograd function's backward refuses in one line."""
    build = _build(tmp_path_factory, f"gpt-moe-pp2-{schedule}", layers, pp=2, pp_schedule=schedule, **more)
    if more:
        assert "stage_output(x, stage=0)" in (build / "stages.py").read_text()
    if schedule in SPLIT_BACKWARD and not splits_custom_functions():
        r = run_train(build, "--steps", 1, *STEPS[2:], run_dir=tmp_path / "pp", nproc=2, timeout=120)
        assert r.returncode != 0 and f"error: --pp-schedule {schedule}: this torch" in r.stderr, r.stderr[-3000:]
        assert not (tmp_path / "pp" / "metrics.jsonl").exists()
        return
    if schedule == "dualpipev":  # GPT ties its embedding and head, which DualPipeV puts on one rank: refused
        r = run_train(build, "--steps", 1, *STEPS[2:], "--grad-accum", 4, run_dir=tmp_path / "tied", nproc=2)
        assert r.returncode != 0 and "error: --pp-schedule dualpipev: two stages on one rank use the same weight" \
            in r.stderr, r.stderr[-3000:]
        build = _build(tmp_path_factory, "llama-moe-pp2-dualpipev", layers, pp=2, pp_schedule=schedule, **more,
                       model="llama.py", config="tiny")
    # DualPipeV runs a micro-batch a stage at least: the build's default, which the test's STEPS would lower
    accum = ["--grad-accum", 4] if schedule == "dualpipev" else []
    runs = []
    for nproc, run in ((1, tmp_path / "one"), (2, tmp_path / "pp")):
        r = run_train(build, "--steps", 4, *STEPS[2:], *accum, run_dir=run, nproc=nproc, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(read_metrics(run / "metrics.jsonl"))
    (one, one_val), (pp, pp_val) = ([[x for x in r if x["kind"] == k] for k in ("train", "val")] for r in runs)
    assert [x["step"] for x in pp] == [x["step"] for x in one] == [1, 2, 3, 4]
    for a, b in zip(one, pp):
        for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)
    # the end-of-run validation: the stages forward only, passing each micro-batch on
    assert [x["step"] for x in pp_val] == [x["step"] for x in one_val] == [4]
    assert pp_val[0]["val_loss"] == pytest.approx(one_val[0]["val_loss"], rel=1e-5)


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


def test_fsdp_on_a_pipeline_is_one_line_exit_2(pp2_build, tmp_path):
    """FSDP2 shards a data-parallel build; a pipeline's stages shard its layers already (--zero shards its
    optimizer state, above). Refused on any number of processes, as for an EP build."""
    r = run_train(pp2_build, "--steps", 1, "--fsdp", run_dir=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: --fsdp shards a data-parallel build, and this build is pipeline "
                                             "parallel (PP=2): each stage holds only its layers already; use --zero "
                                             "to shard the optimizer state"]


def test_a_run_resumes_from_pp2_x_ep2_to_ep4_to_one_process_and_back(pp2_ep2_build, tmp_path_factory, tmp_path):
    """Steps 1-2 under PP2 x EP2 (4 processes), 3-4 under EP4 (4 processes, another build of the same model),
    5-6 on one process, 7-8 under PP2 x EP2 again, each from the checkpoint the one before it wrote (every
    parameter and its optimizer state once, under its name, experts at their global shape): the losses of
    8 steps on one process. Each plan reads the same global batch of 8 sequences in the same 2 micro-batches
    (2 a rank on 2 data-parallel ranks, 1 on 4, 4 on one). A constant LR after the warm-up makes the
    uninterrupted run's schedule that of runs stopped at any step."""
    ep4 = _build(tmp_path_factory, "gpt-moe-ep4", 2, ep=4)
    base = ["--grad-accum", 2, "--log-every", 1, "--eval-every", 0, "--bias-fit", 0, "--bias-refit", 0, "--min-lr-ratio", 1,
            "--ckpt-every", 0]

    def run(build, run_dir, nproc, batch, steps, *more):
        r = run_train(build, *base, "--batch-size", batch, "--steps", steps, *more, run_dir=run_dir, nproc=nproc,
                      timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        return [x for x in read_metrics(run_dir / "metrics.jsonl") if x["kind"] == "train"]

    one = run(pp2_ep2_build, tmp_path / "one", 1, 4, 8)
    moved = tmp_path / "moved"
    for i, (build, nproc, batch) in enumerate([(pp2_ep2_build, 4, 2), (ep4, 4, 1), (pp2_ep2_build, 1, 4),
                                                (pp2_ep2_build, 4, 2)]):
        got = run(build, moved, nproc, batch, 2 * i + 2, *(["--resume"] if i else []))
    assert [x["step"] for x in got] == [x["step"] for x in one] == list(range(1, 9))
    # Not bitwise: each plan sums the gradients, and the logged losses, over its ranks in an order of its own
    # (one process sums over the whole batch at once), so from step 1 on the numbers agree to fp32 rounding
    # only, within the bound the comparisons with one process above use.
    for a, b in zip(one, got):
        for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)
    assert got[-1]["lm_loss"] < got[0]["lm_loss"]
