"""`moec compile` and `moec ir` through click's CliRunner, bad inputs included."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import moec.runtime
from tests.invoke import run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_build(path: Path):
    spec = importlib.util.spec_from_file_location(f"built_{path.name}", path / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return moec.runtime.load_build(mod.Model, path)


@pytest.mark.parametrize("example,args", [
    ("gpt.py", ["--experts", "8", "--topk", "2"]),
    ("gpt.py", ["--experts", "4", "--topk", "1", "--granularity", "2", "--shared-experts", "2",
                "--capacity-factor", "1.25"]),
    ("llama.py", ["--experts", "8", "--topk", "2", "--router", "sigmoid", "--moe-every", "2", "--first-dense", "1"]),
    ("llama.py", ["--experts", "4", "--topk", "2", "--shared-experts", "1", "--pyramid", "8:1",
                  "--upcycle-noise", "0.01"]),
])
def test_compile_writes_a_build_that_runs(tmp_path, example, args):
    out = tmp_path / "build"
    r = run("compile", EXAMPLES / example, "-o", out, *args)
    assert r.exit_code == 0, r.output
    assert "max relative error" in r.output
    assert {p.name for p in out.iterdir()} >= {"model.py", "weights.safetensors", "upcycle.json", "config.json", "ir"}
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["experts"] == int(args[1]) and config["result"]["verify_max_rel_error"] < 1e-4
    model = load_build(out)
    tokens = torch.randint(0, 256, (3, 24))
    result = model(tokens)
    assert result["logits"].shape == (3, 24, 256)
    assert len(result["expert_counts"]) == config["result"]["moe_layers"]
    (result["logits"].logsumexp(-1).mean() + result["aux_loss"] + result["z_loss"]).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_ir_shows_every_pass_and_its_diff(tmp_path):
    out = tmp_path / "b"
    assert run("compile", EXAMPLES / "llama.py", "-o", out, "--experts", "4", "--topk", "2").exit_code == 0
    r = run("ir", out)
    assert r.exit_code == 0
    lines = r.output.splitlines()
    passes = ["capture", "find_ffn", "sample_ffn_inputs", "ffn_to_moe", "lower_moe", "lower_to_triton"]
    assert [ln.split()[1] for ln in lines[1:]] == passes
    moe_row = lines[1 + passes.index("ffn_to_moe")].split()
    assert moe_row[-2] == "4"  # MoE layers
    assert run("ir", out, "--pass", "lower_moe").output.count("torch.ops.moec.experts.default") == 4
    diff = run("ir", out, "--pass", "ffn_to_moe", "--diff").output
    assert diff.startswith("--- before/ffn_to_moe.py") and "+" in diff and "moe_layer" in diff
    bad = run("ir", out, "--pass", "nope")
    assert bad.exit_code == 2 and "passes: capture, find_ffn" in bad.output


def test_compiling_twice_gives_identical_files(tmp_path):
    args = ["--experts", "4", "--topk", "2", "--upcycle-noise", "0.01", "--shared-experts", "1", "--no-verify"]
    for name in ("a", "b"):
        assert run("compile", EXAMPLES / "gpt.py", "-o", tmp_path / name, *args).exit_code == 0
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 8
    for f in files_a:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_weights_upcycles_a_dense_checkpoint(tmp_path):
    import sys
    sys.path.insert(0, str(EXAMPLES))
    import gpt
    torch.manual_seed(123)
    dense = gpt.build_model("tiny")
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    out = tmp_path / "b"
    assert run("compile", EXAMPLES / "gpt.py", "-o", out, "--weights", tmp_path / "dense.pt").exit_code == 0
    model = load_build(out)
    tokens = torch.randint(0, 256, (2, 16))
    dense.eval()
    assert torch.allclose(model(tokens)["logits"], dense(tokens), atol=1e-5)



def test_a_dense_builds_weights_upcycle_with_its_buffers(tmp_path):
    """A build's weights (weights.safetensors, or a run's final.safetensors) hold the buffers of its graph,
    llama's rotary tables among them, which the model file computes itself: --weights accepts them."""
    dense = tmp_path / "dense"
    assert run("compile", EXAMPLES / "llama.py", "--dense", "-o", dense).exit_code == 0
    from safetensors.torch import load_file
    assert any("rope" in n for n in load_file(str(dense / "weights.safetensors")))
    out = tmp_path / "moe"
    result = run("compile", EXAMPLES / "llama.py", "--experts", "4", "--topk", "2", "-o", out,
                 "--weights", dense / "weights.safetensors")
    assert result.exit_code == 0, result.output
    tokens = torch.randint(0, 256, (2, 16))
    assert torch.allclose(load_build(out)(tokens)["logits"], load_build(dense)(tokens)["logits"], atol=1e-5)

BROKEN = {
    "import_error.py": ("import torch\nraise ValueError('boom')\n", "import_error.py:2: importing it failed"),
    "no_factory.py": ("import torch\n", "defines no factory 'build_model'"),
    "control_flow.py": ("""import torch
class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    def forward(self, x):
        h = self.emb(x)
        if h.sum() > 0:
            h = h * 2
        return self.down(torch.relu(self.up(h)))
def build_model():
    return M()
""", "control_flow.py:9"),
    "no_ffn.py": ("""import torch
class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10)
    def forward(self, x):
        return self.head(self.emb(x))
def build_model():
    return M()
""", "no feed-forward block"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_model_files_give_one_line_and_exit_2(tmp_path, name):
    source, message = BROKEN[name]
    (tmp_path / name).write_text(source)
    r = run("compile", tmp_path / name, "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert message in r.output and len(r.output.strip().splitlines()[-1]) > 10
    assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


@pytest.mark.parametrize("args,message", [
    (["--topk", "9", "--experts", "8"], "more than the 8 experts"),
    (["--topk", "0"], "--topk must be at least 1"),
    (["--granularity", "5"], "does not divide the FFN width 384"),
    (["--shared-experts", "8", "--experts", "8"], "less than the 8 routed experts"),
    (["--config", "huge"], "unknown --config 'huge'"),
    (["--pyramid", "8"], "expected EXPERTS:LAYERS"),
    (["--weights", "missing.pt"], "no such file"),
    (["--ep-variant", "hierarchical", "--node-size", "2"], "mean something only with expert parallelism"),
    (["--ep-chunks", "2"], "--ep-chunks means something only with expert parallelism: add --ep N"),
    (["--ep", "2", "--gpus", "8"], "give --ep or --gpus N, not both"),
    (["--hardware", "dgx_h100"], "--hardware only means something with --gpus N"),
    (["--stop-after", "nowhere"], "--stop-after nowhere: no such pass"),
])
def test_bad_options_give_one_line_and_exit_2(tmp_path, args, message):
    r = run("compile", EXAMPLES / "llama.py", "-o", tmp_path / "out", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_missing_file_and_non_empty_build_dir(tmp_path):
    r = run("compile", tmp_path / "nope.py", "-o", tmp_path / "out")
    assert r.exit_code == 2 and "no such file" in r.output
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run("compile", EXAMPLES / "gpt.py", "-o", out)
    assert r.exit_code == 2 and "--force" in r.output
    assert (out / "keep.txt").read_text() == "mine"
    r = run("compile", EXAMPLES / "gpt.py", "-o", out, "--force")  # not a build: --force does not delete it
    assert r.exit_code == 2 and "no moec config.json" in r.output and (out / "keep.txt").read_text() == "mine"


def test_gpus_lets_the_planner_choose_and_records_it(tmp_path):
    out = tmp_path / "b"
    r = run("compile", EXAMPLES / "llama.py", "-o", out, "--experts", "8", "--topk", "2", "--gpus", "16",
            "--hardware", "dgx_h100")
    assert r.exit_code == 0, r.output
    plan = json.loads((out / "plan.json").read_text())
    chosen = plan["chosen"]
    assert chosen["ep"] * chosen["dp"] * chosen["tp"] * chosen["pp"] == 16
    rows = json.loads((out / "ir" / "summary.json").read_text())
    passes = [r["pass"] for r in rows]
    # only plans train.py carries out are chosen, and the build is compiled for the one chosen
    assert chosen["tp"] == chosen["pp"] == 1 and chosen["zero"] <= 1 and not chosen["recompute"]
    assert "plan_sharding" in passes and ("insert_collectives" in passes) == (chosen["ep"] > 1)
    options = json.loads((out / "config.json").read_text())["options"]
    assert (options["ep"], options["zero"], options["gpus"]) == (chosen["ep"], chosen["zero"], 16)
