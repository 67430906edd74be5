"""train.py of a build compiled with --ep 2: expert parallel under torchrun (gloo,
2 processes), resumed on one process from its checkpoint (experts resharded), and
that one process's checkpoint resumed under torchrun again."""
from moec.runtime.training.progress import read_metrics
from tests.train.conftest import run_train


def test_ep2_trains_under_torchrun_and_resumes_on_one_process(ep2_build, tmp_path):
    run = tmp_path / "run"
    r = run_train(ep2_build, "--steps", 4, "--log-every", 1, "--ckpt-every", 4, "--eval-every", 0, run_dir=run, nproc=2,
                  timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    train = [x for x in read_metrics(run / "metrics.jsonl") if x["kind"] == "train"]
    assert [x["step"] for x in train] == [1, 2, 3, 4]
    assert train[-1]["lm_loss"] < train[0]["lm_loss"]
    # each rank routed its 4x32 tokens to 2 of 4 experts: 64 slots per expert per rank on average
    assert all(layer["mean"] == 64 for x in train for layer in x["expert_load"])
    assert not (run / "final.safetensors").exists()  # experts are split over ranks: the checkpoint holds them

    resumed = run_train(ep2_build, "--steps", 6, "--log-every", 1, "--eval-every", 0, "--ckpt-every", 6, "--resume",
                        run_dir=run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [x["step"] for x in read_metrics(run / "metrics.jsonl") if x["kind"] == "train"]
    assert steps[-2:] == [5, 6]
    assert (run / "final.safetensors").is_file()  # one process holds every expert again

    again = run_train(ep2_build, "--steps", 8, "--log-every", 1, "--eval-every", 0, "--resume", run_dir=run, nproc=2,
                      timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    train = [x for x in read_metrics(run / "metrics.jsonl") if x["kind"] == "train"]
    assert [x["step"] for x in train][-2:] == [7, 8] and train[-1]["lm_loss"] < train[0]["lm_loss"]
