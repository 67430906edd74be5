"""Verification of builds whose options leave the dense function by design (Drop-Upcycling, scaled gate
weights, noise): the exact construction is still checked, and the build's own step-0 error is reported
and recorded, not refused."""
import json
from pathlib import Path

import pytest

from moec.base.options import Options
from moec.driver.compiler import compile_model

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=64)


@pytest.mark.parametrize("options, flags", [(dict(drop_upcycle=0.5), "--drop-upcycle"),
                                            (dict(router_weights="scaled"), "--router-weights scaled"),
                                            (dict(), None)])
def test_the_build_reports_how_far_its_options_start_from_the_dense_model(tmp_path, options, flags):
    lines = []
    compile_model(str(ROOT / "examples" / "gpt.py"), str(tmp_path / "b"),
                  Options(experts=4, topk=2, overrides=TINY, **options), log=lines.append)
    result = json.loads((tmp_path / "b" / "config.json").read_text())["result"]
    assert result["verify_max_rel_error"] < 1e-4  # the exact construction, checked as ever
    reported = [line for line in lines if "the build starts" in line]
    if flags is None:
        assert result["step0_rel_error"] is None and reported == []
    else:
        assert result["step0_rel_error"] > 1e-3
        assert reported == [f"verify: with {flags} the build starts {result['step0_rel_error']:.2e} (relative) "
                            f"from the dense model's logits"]
