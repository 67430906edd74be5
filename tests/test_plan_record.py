"""The parallel plan is one record of the options: from flags, --plan plan.json or the planner; what the
training program cannot carry out is refused at compile time, and train.py refuses a world that does not
fit the plan."""
import json
import re
import subprocess
import sys

import pytest

from moec.base.errors import MoecError
from moec.base.options import PLAN_FIELDS, Options
from moec.cost_model import rank_plans
from moec.cost_model.known_models import MIXTRAL_8X7B
from moec.runtime.training.parallel import check_world
from tests.test_cli import EXAMPLES, run

TINY = ["--set", "n_layer=2", "--set", "n_head=2", "--set", "n_embd=32", "--set", "block_size=64"]


@pytest.mark.parametrize("args,message", [
    (["--tp", "2"], "--tp 2 with --ep 1: routed experts are not split by TP but sharded by expert parallelism, "
                    "which must be at least TP (as torchtitan requires); use --ep 2 or more"),
    (["--tp", "2", "--dense", "--zero", "3"], "--zero 3 (FSDP2) shards a data-parallel build, and this plan is "
                                              "EP1 DP* TP2 PP1 ZeRO-3: use --zero 1 to shard the optimizer state"),
    (["--tp", "2", "--dense", "--pp", "2", "--zero", "3"], "--zero 3 (FSDP2) shards a data-parallel build, and "
                                                           "this plan is EP1 DP* TP2 PP2 ZeRO-3"),
    (["--zero", "2"], "--zero 2: the training program runs ZeRO-1 (optimizer state) or ZeRO-3 (FSDP2), not 2"),
    (["--zero", "3", "--ep", "2"], "--zero 3 (FSDP2) shards a data-parallel build, and this plan is EP2"),
    (["--zero", "4"], "--zero one of 0-3"),
    (["--gpus", "8", "--recompute"], "give --recompute or --gpus N, not both"),
    (["--pp-schedule", "gpipe"], "--pp-schedule gpipe means something only with pipeline parallelism"),
    (["--gpus", "8", "--zero", "1"], "give --zero or --gpus N, not both"),
    (["--pp", "2", "--zero", "3"], "--zero 3 (FSDP2) shards a data-parallel build, and this plan is EP1 DP* TP1 PP2 "
                                   "ZeRO-3: use --zero 1 to shard the optimizer state"),
    (["--plan", "missing.json"], "--plan missing.json: no such file or directory"),
    (["--sequence-parallel"],
     "--sequence-parallel splits the tokens over the tensor-parallel ranks: add --tp N (N > 1)"),
    (["--tp", "2", "--ep", "2", "--pp", "2", "--sequence-parallel"],
     "--sequence-parallel with --pp 2: the training program does not combine them yet; drop one"),
    (["--tp", "2", "--ep", "2", "--aux-loss-scope", "sequence", "--sequence-parallel"],
     "--sequence-parallel with --aux-loss-scope sequence: the balance loss of each sequence needs it whole"),
])
def test_plans_the_training_program_cannot_run_are_refused_at_compile_time(tmp_path, args, message):
    r = run("compile", EXAMPLES / "gpt.py", "-o", tmp_path / "out", *TINY, *args)
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1] == f"error: {message}" or message in r.output.strip().splitlines()[-1]
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("plan", [dict(tp=2, ep=2, zero=1), dict(tp=2, dense=True, zero=1), dict(tp=2, ep=2, pp=2),
                                  dict(tp=2, dense=True, pp=2), dict(pp=2, zero=1), dict(pp=2, ep=2, zero=1),
                                  dict(pp=2, tp=2, ep=2, zero=1), dict(pp=2, tp=2, dense=True, zero=1),
                                  dict(recompute=True), dict(recompute=True, ep=2, zero=1),
                                  dict(recompute=True, pp=2, ep=2), dict(recompute=True, dense=True, zero=3)])
def test_tp_zero1_a_pipeline_and_recompute_are_plans_the_training_program_runs(plan):
    assert list(Options(experts=4, **plan).runtime_problems()) == []
    assert list(Options(experts=4, **plan).planner_problems()) == []  # and the --gpus search ranks them


def test_a_pipeline_with_zero1_compiles(tmp_path):
    r = run("compile", EXAMPLES / "gpt.py", "-o", tmp_path / "out", *TINY, "--experts", "4", "--no-verify",
            "--pp", "2", "--zero", "1")
    assert r.exit_code == 0, r.output
    options = Options.from_json(json.loads((tmp_path / "out" / "config.json").read_text())["options"])
    assert (options.pp, options.zero) == (2, 1)


@pytest.mark.parametrize("record,extra,message", [
    ({"chosen": {"ep": 2, "dp": 1, "tp": 2, "pp": 1, "zero": 3, "recompute": False}}, [],
     "--zero 3 (FSDP2) shards a data-parallel build, and this plan is EP2 DP1 TP2 PP1 ZeRO-3"),
    ({"ep": 2}, ["--ep", "2"], "gives the parallel plan: drop --ep"),
    ([1, 2], [], "expected plan.json, or an object of ep, dp, tp, pp, zero, recompute, micro_batch, micro_batches"),
    ({"ep": 3}, [], "--ep 3 does not divide the 4 routed experts"),
])
def test_a_plan_file_is_checked_like_flags(tmp_path, record, extra, message):
    (tmp_path / "plan.json").write_text(json.dumps(record))
    r = run("compile", EXAMPLES / "gpt.py", "-o", tmp_path / "out", *TINY, "--experts", "4",
            "--plan", tmp_path / "plan.json", *extra)
    assert r.exit_code == 2, r.output
    assert message in r.output.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_a_plan_file_becomes_the_builds_plan(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps({"chosen": {"ep": 2, "dp": 2, "tp": 1, "pp": 1, "zero": 1,
                                                               "recompute": False, "gpus": 4, "micro_batch": 3,
                                                               "micro_batches": 5}}))
    out = tmp_path / "out"
    r = run("compile", EXAMPLES / "gpt.py", "-o", out, *TINY, "--experts", "4", "--no-verify",
            "--plan", tmp_path / "plan.json")
    assert r.exit_code == 0, r.output
    options = Options.from_json(json.loads((out / "config.json").read_text())["options"])
    assert (options.ep, options.dp, options.tp, options.pp, options.zero) == (2, 2, 1, 1, 1)
    # the micro-batches the plan was costed for are the training program's
    usage = subprocess.run([sys.executable, out / "train.py", "--help"], capture_output=True, text=True).stdout
    assert re.search(r"--batch-size BATCH_SIZE\s+sequences per rank per micro-batch \(default: 3\)", usage), usage
    assert re.search(r"--grad-accum GRAD_ACCUM\s+micro-batches .*\(default: 5\)", usage, re.S), usage


def test_a_planned_build_reads_its_plan_back(tmp_path):
    """Every field of the planner's choice is in config.json, and train.py can read it (a planned EP build's
    options once failed their own validation: --ep and --gpus both set)."""
    out = tmp_path / "b"
    r = run("compile", EXAMPLES / "llama.py", "-o", out, "--experts", "8", "--topk", "2", "--gpus", "16",
            "--hardware", "frontier", "--no-verify", "--max-weights-gb", "0")
    assert r.exit_code == 0, r.output
    chosen = json.loads((out / "plan.json").read_text())["chosen"]
    options = Options.from_json(json.loads((out / "config.json").read_text())["options"])
    assert {k: getattr(options, k) for k in PLAN_FIELDS} == {k: chosen[k] for k in PLAN_FIELDS}
    assert not list(options.runtime_problems())


@pytest.mark.parametrize("plan,world,message", [
    (dict(ep=2), 3, "needs a multiple of 2 processes, not 3: start torchrun with 2"),
    (dict(ep=2, dp=2), 2, "runs on 4 processes, not 2: start torchrun with 4 in all"),
    (dict(ep=4), 6, "needs a multiple of 4 processes, not 6: start torchrun with 4"),
    (dict(ep=2, tp=2), 2, r"\(EP2 PP1 TP2\) needs a multiple of 4 processes, not 2: start torchrun with 4"),
])
def test_a_world_that_does_not_fit_the_plan_is_refused(plan, world, message):
    with pytest.raises(MoecError, match=message):
        check_world(Options(experts=4, **plan), world)


@pytest.mark.parametrize("plan,world", [(dict(ep=2), 1), (dict(ep=2), 4), (dict(ep=2, dp=2), 4), (dict(), 3),
                                        (dict(ep=2, tp=2), 8), (dict(ep=2, tp=2), 1)])
def test_a_world_that_fits_the_plan_runs(plan, world):
    check_world(Options(experts=4, **plan), world)


def test_the_planner_chooses_whole_layer_recompute_where_only_it_fits(tmp_path):
    """7b with 64 experts on 128 MI250X GCDs fits only with whole-layer recomputation: the planner chooses
    such a plan and model.py recomputes its layers."""
    r = run("compile", EXAMPLES / "llama.py", "-o", tmp_path / "out", "--config", "7b", "--experts", "64",
            "--topk", "8", "--gpus", "128", "--hardware", "frontier")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["chosen"]["recompute"] is True
    assert "RECOMPUTE = True" in (tmp_path / "out" / "model.py").read_text()


def test_the_planner_says_when_no_plan_train_py_runs_fits():
    """Mixtral-8x7B on 8 MI250X GCDs fits no plan: the error says it searched only the plans train.py runs."""
    with pytest.raises(MoecError, match=r"no parallel plan of Mixtral-8x7B fits 8 x MI250X GCD .* among the 70 of "
                                        r"140 plans train.py runs"):
        rank_plans(MIXTRAL_8X7B.shape(), MIXTRAL_8X7B.moe, 8, "frontier", allowed=lambda p: not p.recompute)


@pytest.mark.parametrize("args,message", [
    (["--pp", "3"], "3 pipeline stages need at least 3 layers, and the model has 2"),
    (["--pp", "2", "--pp-schedule", "interleaved-1f1b"], "4 pipeline stages need at least 4 layers"),
    (["--tp", "4", "--ep", "4"], "--tp 4: the attention of h.0.attn has 2 query and 2 key/value heads, which TP=4 "
                                 "must divide; use a --tp that divides them"),
    (["--tp", "2", "--dense", "--set", "n_embd=33", "--set", "n_head=1"],
     "--tp 2: the attention of h.0.attn has 1 query and 1 key/value heads, which TP=2 must divide"),
    (["--tp", "2", "--dense", "--set", "dropout=0.1"], "drops out with p=0.1, which the ranks of a TP group would "
                                                       "draw differently; build the model with dropout 0"),
])
def test_more_stages_than_layers_is_refused_after_the_capture(tmp_path, args, message):
    r = run("compile", EXAMPLES / "gpt.py", "-o", tmp_path / "out", *TINY, "--no-verify", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == []
