"""train.py of builds compiled with --tp 2 under torchrun (gloo): a dense TP2 build gives the losses of the same
build on one process, and its checkpoints (the split weights at their global shapes) resume on one process
and back; TP2 x EP2 on 4 processes gives them too (the ranks of a TP group read the same data and hold the same
experts), with the same collectives on every rank of a group, also when a layer's experts on one EP rank get no
token, and with --sequence-parallel (each rank of a TP group holding half of the tokens between its split
linears); micro-batches of one token, fewer than the TP ranks, give them too; TP2 x DP2 with ZeRO-1 (each slice's
optimizer state sharded over the ranks holding that slice) gives them too, resuming from one process's checkpoint
and writing one that one process resumes; train.py's --fsdp, which TP does not combine with, is refused in one line."""
import pytest
from safetensors.torch import load_file

from moec.base.options import Options
from moec.driver.compiler import compile_model
from moec.runtime.distributed.checkpoint import read_metadata
from moec.runtime.training.checkpoint import read_weights
from moec.runtime.training.progress import read_metrics
from tests.train.conftest import ROOT, TINY, collectives, run_train, starve_experts

# a constant LR after the warm-up: a run stopped at any step follows the uninterrupted run's schedule
STEPS = ["--grad-accum", 2, "--log-every", 1, "--eval-every", 0, "--bias-fit", 0, "--bias-refit", 0, "--min-lr-ratio", 1]


def _build(tmp_path_factory, name: str, **plan):
    out = tmp_path_factory.mktemp("builds") / name
    options = Options(experts=4, topk=2, overrides=TINY, verify=False, **plan)
    compile_model(str(ROOT / "examples" / "gpt.py"), str(out), options, log=lambda *a: None)
    return out


def _train(build, run_dir, nproc, steps, *extra):
    r = run_train(build, *STEPS, "--steps", steps, *extra, run_dir=run_dir, nproc=nproc, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    # a resumed run starts from the checkpoint (one process starting over would give the same losses)
    assert "--resume" not in extra or "resume: from " in r.stderr, r.stderr[-3000:]
    return [x for x in read_metrics(run_dir / "metrics.jsonl") if x["kind"] == "train"]


def _same(reference: list, got: list, steps: list, learns: bool = True) -> None:
    """learns: the loss falls over the run (not asked of runs too short for it to)."""
    assert [x["step"] for x in got] == [x["step"] for x in reference] == steps
    for a, b in zip(reference, got):
        for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm"):
            assert (key in b) == (key in a) and b.get(key) == pytest.approx(a.get(key), rel=1e-5, abs=1e-5), \
                (a["step"], key)
    assert got[-1]["lm_loss"] < got[0]["lm_loss"] or not learns


@pytest.fixture(scope="module")
def tp2_dense_build(tmp_path_factory):
    return _build(tmp_path_factory, "gpt-dense-tp2", dense=True, tp=2)


def test_tp2_gives_the_single_process_losses_and_resumes_on_one_process_and_back(tp2_dense_build, tmp_path):
    """Steps 1-4 under TP2, 5-6 on one process from its checkpoint, 7-8 under TP2 again: the losses and gradient
    norms (clipped over both ranks' slices) of 8 steps on one process."""
    build = tp2_dense_build
    one = _train(build, tmp_path / "one", 1, 8)
    moved = tmp_path / "moved"
    _train(build, moved, 2, 4)
    step4 = moved / "checkpoints" / "step_00000004"
    chunks = read_metadata(step4).state_dict_metadata["model.h.0.attn.c_attn.weight"].chunks
    assert sorted(list(c.sizes) for c in chunks) == [[3, 16, 32]] * 2  # each rank's heads of q, k and v
    weights = read_weights(step4)
    assert {n: t.shape for n, t in weights.items()} == \
        {n: t.shape for n, t in load_file(build / "weights.safetensors").items()}
    _train(build, moved, 1, 6, "--resume")
    got = _train(build, moved, 2, 8, "--resume")
    _same(one, got, list(range(1, 9)))


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
def test_tp2_x_ep2_on_four_processes_gives_the_single_process_losses(tmp_path_factory, tmp_path, sequence_parallel):
    """With shared experts (split like a dense FFN) and routed ones (EP): the 2 ranks of a TP group read the same
    share of the step's 8 sequences, each EP rank half of each micro-batch; the same weights, so one process's
    losses, gradient norms and expert load on all 8. Layer 1 sends every token to experts 2 and 3: those of
    EP rank 0 (ranks 0 and 1) get none. With --sequence-parallel each rank of a TP group holds half of each
    sequence's tokens outside attention and the shared experts (norms, routers, routed experts run on them): the
    balance and z losses are the TP group's, the gradients of what ran on a shard summed over it."""
    tp2 = _build(tmp_path_factory, f"gpt-moe-tp2-ep2-{sequence_parallel}", ep=2, tp=2, shared_experts=1,
                 sequence_parallel=sequence_parallel)
    starve_experts(tp2, 1, [2, 3])
    reference = _train(tp2, tmp_path / "one", 1, 4, "--ckpt-every", -1)
    assert all(x["expert_load"][1]["cv"] == pytest.approx(1.0) for x in reference)  # two of four experts idle
    got = _train(tp2, tmp_path / "tp2", 4, 4, "--batch-size", 2, "--ckpt-every", -1, "--debug-collectives")
    ops, links = collectives(tmp_path / "tp2", 4)
    assert links == set()
    tp_ops = {"all_reduce"} | ({"all_gather_into_tensor", "reduce_scatter_tensor"} if sequence_parallel else set())
    assert all(tp_ops <= ops[frozenset(g)] for g in ({0, 1}, {2, 3}))  # the TP groups
    assert all("all_to_all_single" in ops[frozenset(g)] for g in ({0, 2}, {1, 3}))  # the EP groups
    _same(reference, got, [1, 2, 3, 4])
    for a, b in zip(reference, got):
        for la, lb in zip(a["expert_load"], b["expert_load"], strict=True):
            # per rank, the sum over 4 ranks of counts each TP group holds twice (or, sequence parallel, once):
            # half (a quarter) of one process's
            times = 4 if sequence_parallel else 2
            lb = {**lb, "max": lb["max"] * times, "mean": lb["mean"] * times}
            assert lb == pytest.approx(la, rel=1e-9), a["step"]


def test_fewer_tokens_than_tp_ranks_give_the_single_process_losses(tp2_dense_build, tmp_path):
    """Micro-batches of one token on a TP group of 2: TP splits heads and hidden units, not the tokens, which every
    rank of the group holds, so there is nothing to split short."""
    one_token = ["--batch-size", 1, "--seq-len", 1, "--ckpt-every", -1]
    reference = _train(tp2_dense_build, tmp_path / "one", 1, 2, *one_token)
    _same(reference, _train(tp2_dense_build, tmp_path / "tp2", 2, 2, *one_token), [1, 2], learns=False)


def test_tp2_x_dp2_with_zero1_gives_the_single_process_losses_and_its_sharded_state_resumes(tmp_path_factory,
                                                                                            tmp_path):
    """Compiled with --zero 1, on 4 processes: two TP groups (ranks 0, 1 and 2, 3), each TP slice's optimizer state
    sharded over the 2 ranks holding that slice (ranks 0, 2 and 1, 3, which read different halves of the step's 8
    sequences). Steps 1-2 on one process, 3-4 under TP2 x DP2 resuming from its checkpoint (the whole state
    resharded), 5-6 on one process from the 4 ranks' checkpoint (each parameter's state saved by the rank updating
    it, a slice's at its global shape): the losses and gradient norms of 6 steps on one process."""
    build = _build(tmp_path_factory, "gpt-dense-tp2-zero1", dense=True, tp=2, zero=1)
    one = _train(build, tmp_path / "one", 1, 6)
    moved = tmp_path / "moved"
    _train(build, moved, 1, 2)
    _train(build, moved, 4, 4, "--resume", "--batch-size", 2, "--debug-collectives")
    ops, _ = collectives(moved, 4)
    assert all("all_reduce" in ops[frozenset(g)] for g in ({0, 1}, {2, 3}))  # the TP groups
    assert all({"all_reduce", "broadcast"} <= ops[frozenset(g)] for g in ({0, 2}, {1, 3}))  # gradients, ZeRO
    saved = read_metadata(moved / "checkpoints" / "step_00000004").state_dict_metadata
    for key in ("model.h.0.attn.c_attn.weight", "optim.h.0.attn.c_attn.weight.exp_avg"):
        assert sorted(list(c.sizes) for c in saved[key].chunks) == [[3, 16, 32]] * 2, key  # each TP slice once
    got = _train(build, moved, 1, 6, "--resume")
    _same(one, got, list(range(1, 7)))


def test_fsdp_which_tp_does_not_combine_with_is_one_line_before_training(tp2_dense_build, tmp_path):
    r = run_train(tp2_dense_build, "--steps", 1, "--fsdp", run_dir=tmp_path / "run", nproc=2, timeout=120)
    assert r.returncode != 0
    assert "error: --fsdp shards a data-parallel build, and this build is tensor parallel (TP=2)" in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
