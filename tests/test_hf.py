"""Hugging Face causal LMs built from configs compile and keep the dense function."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from moec.driver.cli import main

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_llama.py"


@pytest.mark.parametrize("config", ["llama", "qwen2", "gpt2"])
def test_hf_models_compile_and_verify(tmp_path, config):
    r = CliRunner().invoke(main, ["compile", str(EXAMPLE), "--config", config, "--experts", "4", "--topk", "2",
                                  "-o", str(tmp_path / config)])
    assert r.exit_code == 0, r.output
    assert "02 ffn_to_moe" in r.output and "max relative error" in r.output
    ffn_line = next(line for line in r.output.splitlines() if "02 ffn_to_moe" in line)
    assert "changed" in ffn_line.split()  # the word, not "unchanged"
