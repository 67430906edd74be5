"""What a new user meets first: mistakes reported in one line before the capture, --force replacing only a
build, weight files that are not safe to load named as such, a build without weights refused before its
model is allocated, and tables whose columns stay apart at 70B scale."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from triton import _utils as triton_utils

import moec.runtime
from moec.base.errors import MoecError
from moec.driver import compiler
from moec.driver.pipeline import _count
from tests.invoke import one_line, run

GPT = Path(__file__).resolve().parent.parent / "examples" / "gpt.py"
TINY = ["--experts", "4", "--no-verify", *[a for kv in ("n_layer=2", "n_head=2", "n_embd=32", "vocab_size=64",
                                                     "block_size=32") for a in ("--set", kv)]]
# ~550B parameters on the meta device: compiles in seconds, writes no weights, cannot be allocated on CPU
HUGE = ["--experts", "64", "--no-verify", "--set", "n_layer=1", "--set", "n_head=1", "--set", "n_embd=32768"]


def test_force_replaces_only_a_build(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a").write_text("x")
    line = one_line(run("compile", GPT, "-o", mine, "--force", *TINY))
    assert "no moec config.json" in line and (mine / "a").read_text() == "x"
    afile = tmp_path / "afile"
    afile.write_text("x")
    for force in ([], ["--force"]):
        assert "is a file, not a directory" in one_line(run("compile", GPT, "-o", afile, *force, *TINY))
        assert afile.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("compile", GPT, "-o", empty, *TINY, "--stop-after", "find_ffn").exit_code == 0
    assert run("compile", GPT, "-o", empty, *TINY, "--stop-after", "find_ffn", "--force").exit_code == 0


def _files(tmp_path: Path) -> None:
    """Inputs that are wrong in every way a compile can find before it captures the model."""
    torch.save({"a": object()}, tmp_path / "pickle.pt")
    torch.save({"a": np.zeros(3)}, tmp_path / "numpy.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    torch.save({"a": 1}, tmp_path / "int.pt")
    torch.save({"wte.weight": torch.zeros(3, 3)}, tmp_path / "names.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "odd.bin").write_bytes(b"abc")
    (tmp_path / "afile").write_text("x")


BEFORE_CAPTURE = [
    (["--weights", "missing.pt"], "--weights missing.pt: no such file"),
    (["--weights", "."], "--weights .: a directory without model.safetensors or model.safetensors.index.json"),
    (["--weights", "pickle.pt"], "not a safe weights file: it pickles object"),
    (["--weights", "numpy.pt"], "it pickles numpy"),
    (["--weights", "list.pt"], "holds a list, not a state dict"),
    (["--weights", "int.pt"], "'a' is not a tensor but int"),
    (["--weights", "names.pt"], "weights do not match the model: missing"),
    (["--weights", "junk.safetensors"], "cannot read it (SafetensorError"),
    (["--calibration-data", "missing.txt"], "--calibration-data missing.txt: no such file"),
    (["--calibration-data", "odd.bin"], "3 bytes is not a whole number of uint16 token ids"),
    (["--gpus", "8", "--hardware", "nope"], "no hardware profile 'nope'"),
    (["--stop-after", "nowhere"], "--stop-after nowhere: no such pass"),
    (["--ep", "3"], "--ep 3 does not divide the 4 routed experts of a layer; pick an EP that divides 4"),
    (["--ep", "2", "--pyramid", "3:1"], "the 3 and 4 routed experts"),
    (["-o", "afile"], "-o afile is a file"),
]


@pytest.mark.parametrize("args,message", BEFORE_CAPTURE)
def test_mistakes_are_one_line_before_the_capture(tmp_path, monkeypatch, args, message):
    _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compiler, "capture", lambda *a: pytest.fail("captured before finding the mistake"))
    out = [] if "-o" in args else ["-o", "out"]
    line = one_line(run("compile", GPT, *TINY, *out, *args))
    assert message in line and "weights_only=False" not in line
    if args[-1] in ("pickle.pt", "numpy.pt", "list.pt", "int.pt", "junk.safetensors"):  # the format is wrong
        assert ".safetensors file or a torch.save'd state dict of tensors" in line
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".moec-") for p in tmp_path.iterdir())


@pytest.mark.parametrize("args,message", [
    (["--granularity", "5"], "--granularity 5 does not divide the FFN width 128; pick a divisor of 128"),
    (["--first-dense", "2"], "--first-dense 2 leaves none of the model's 2 FFNs to convert"),
])
def test_what_needs_the_model_is_checked_on_the_capture_before_any_pass(tmp_path, monkeypatch, args, message):
    monkeypatch.setattr(compiler, "run_pipeline", lambda *a: pytest.fail("ran the passes"))
    r = run("compile", GPT, *TINY, "-o", tmp_path / "out", *args)
    first, last = r.output.strip().splitlines()
    assert r.exit_code == 2 and first.startswith("capture:") and last == f"error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def huge_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("huge") / "b"
    r = run("compile", GPT, "-o", out, *HUGE)
    assert r.exit_code == 0 and "none written" in r.output, r.output
    (out / "compile.log").write_text(r.output)
    return out


def test_train_py_of_a_build_without_weights_is_one_line(huge_build):
    config = json.loads((huge_build / "config.json").read_text())["result"]
    assert not config["weights_written"] and config["weights_bytes"] > 4 * 2**30 and config["moe_weights_bytes"] > 2**40
    r = subprocess.run([sys.executable, huge_build / "train.py", "--steps", "1", "--run-dir", huge_build / "r"],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "weights.safetensors does not exist: the build was compiled without weights" in lines[0], lines[0]


def test_missing_weights_say_how_large_they_would_be(huge_build):
    with pytest.raises(MoecError) as e:
        moec.runtime.weights.require_weights(huge_build)
    gib = json.loads((huge_build / "config.json").read_text())["result"]["weights_bytes"] / 2**30
    assert f"their {gib:,.1f} GiB are over --max-weights-gb 4" in str(e.value) and "\n" not in str(e.value)


def test_ir_columns_stay_apart_for_a_huge_model(huge_build):
    r = run("ir", huge_build)
    header, *rows = r.output.splitlines()
    assert header.split() == ["#", "pass", "nodes", "params", "active/token", "MoE", "layers", "changed"]
    summary = json.loads((huge_build / "ir" / "summary.json").read_text())
    for line, expected in zip(rows, summary, strict=True):
        cells = line.split()
        assert len(cells) == 7, line
        assert int(cells[3].replace(",", "")) == expected["params"] > 0
        assert int(cells[4].replace(",", "")) == expected["active_params"]
    assert len(f"{max(s['params'] for s in summary):,}") >= 15  # as wide as the columns used to be


def test_compile_log_counts_in_units(huge_build):
    summary = json.loads((huge_build / "ir" / "summary.json").read_text())
    logged = [ln.split() for ln in (huge_build / "compile.log").read_text().splitlines() if ln.startswith("  0")]
    assert [ln[1] for ln in logged] == [s["pass"] for s in summary[1:]]
    assert [ln[4:6] for ln in logged] == [[f"{s['params'] / 1e9:.2f}", "B"] for s in summary[1:]]
    assert [_count(n) for n in (999, 858_880, 4_550_912, 3_620_419_674_112)] == ["999", "858.88 K", "4.55 M",
                                                                                "3.62 T"]


FUSION_WARNINGS = """
import warnings
from triton import _utils
from moec.codegen import report, routing
from moec.codegen.cross_compile import compile_for

spec = routing.portable_specs("gfx942")[0]
report.spec_modules = lambda: [type("One", (), {"__name__": "routing", "portable_specs": lambda arch: [spec]})]

def fusion_warnings(run):
    if hasattr(_utils, "warn_once"):  # Triton warns once a process; a Triton without it (3.6) never warns
        _utils.warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run()
    return sum("TRITON_DEFAULT_FP_FUSION" in str(w.message) for w in seen)

print(fusion_warnings(lambda: compile_for(*spec[1:4], "gfx942", spec[4])),
      fusion_warnings(lambda: report.compile_all(["gfx942"])))
"""


def test_kernels_report_prints_no_triton_warning_above_the_table():
    # a fresh process: Triton's interpreter, which the other tests run kernels under on CPU, cannot compile
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    r = subprocess.run([sys.executable, "-c", FUSION_WARNINGS], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # compile_for alone leaves the choice to Triton, which warns where it has the warning; the report makes it
    alone, report = r.stdout.split()
    assert report == "0"
    assert alone == ("1" if hasattr(triton_utils, "warn_once") else "0")


def test_progress_bar_and_metrics_line_agree_on_tokens_per_second(tmp_path):
    build = tmp_path / "b"
    assert run("compile", GPT, "-o", build, *TINY, "--set", "vocab_size=256").exit_code == 0  # bytes
    r = subprocess.run([sys.executable, build / "train.py", "--steps", "20", "--log-every", "5", "--eval-every",
                        "0", "--ckpt-every", "-1", "--batch-size", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    bar = {int(m[0]): m[1] for m in re.findall(r"\] (\d+)/20 loss \S+ ([\d,]+) tok/s", r.stderr)}
    line = {int(m[0]): m[1] for m in re.findall(r"^step (\d+): lm .* ([\d,]+) tok/s", r.stderr, re.M)}
    assert sorted(line) == [5, 10, 15, 20] and all(bar[s] == line[s] for s in line), r.stderr
