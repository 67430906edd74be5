"""train.py checks the world torchrun started against its build's plan before it does any work."""
from tests.train.conftest import run_train


def test_train_py_refuses_a_world_that_does_not_fit_before_any_work(ep2_build, tmp_path):
    r = run_train(ep2_build, "--steps", 1, run_dir=tmp_path / "run", nproc=3, timeout=120)
    assert r.returncode != 0
    assert "error: this build's plan (EP2 PP1 TP1) needs a multiple of 2 processes, not 3" in r.stderr
    assert not (tmp_path / "run").exists()
