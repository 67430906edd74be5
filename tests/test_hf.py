"""Every Hugging Face decoder family of examples/hf_models.py compiles, verifies against its dense model,
and learns a batch through its emitted model.py: one table (FAMILIES), one test per family. train.py itself,
which is the same for every family, runs a family here on a GPU and in the tests of checkpoints in and out."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from moec.base.options import Options
from moec.driver.cli import main
from moec.driver.compiler import compile_model
from tests.hf_checkpoints import load_program
from tests.train.conftest import run_train

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_models.py"
sys.path.insert(0, str(EXAMPLE.parent))
from hf_models import FAMILIES  # noqa: E402


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _learns(build: Path) -> list[float]:
    """The losses (language model plus the MoE losses) of 8 Adam steps on one batch, in this process."""
    model = load_program(build).train()  # experts upcycled from the dense weights, as train.py makes them
    torch.manual_seed(0)
    ids = torch.randint(0, model(torch.zeros(1, 2, dtype=torch.long))["logits"].shape[-1], (4, 33))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out["logits"].flatten(0, 1), ids[:, 1:].flatten())
        loss = loss + out["aux_loss"] + out["z_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_compiles_verifies_and_learns(tmp_path, family):
    build = tmp_path / family
    report = compile_model(str(EXAMPLE), str(build), Options(experts=4, topk=2, config=family), log=lambda *a: None)
    assert report["moe_layers"] == 2
    assert report["verify_max_rel_error"] < 1e-4  # the upcycled model computes the dense model's logits
    losses = _learns(build)
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < losses[0] - 0.1, losses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: the build's train.py on a GPU")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_on_gpu(tmp_path, family):
    build = tmp_path / family
    compile_model(str(EXAMPLE), str(build), Options(experts=4, topk=2, config=family, verify=False),
                  log=lambda *a: None)
    r = run_train(build, "--steps", "3", "--log-every", "1", "--device", "cuda", "--eval-every", "0",
                  "--ckpt-every", "0", run_dir=tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    losses = _losses(tmp_path / "run")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_cli_reports_the_moe_rewrite(tmp_path):
    r = CliRunner().invoke(main, ["compile", str(EXAMPLE), "--config", "falcon", "--experts", "4", "--topk", "2",
                                  "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    ffn_line = next(line for line in r.output.splitlines() if "03 ffn_to_moe" in line)
    assert "changed" in ffn_line.split()  # the word, not "unchanged"
    assert "max relative error" in r.output
