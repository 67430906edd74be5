"""The emitted model.py: a class per distinct block, a loop over the layers, as long at 12 layers as at 2,
loading the same weights and computing what the dense model computes."""
import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moec.base.errors import MoecError
from moec.base.options import Options
from moec.driver.compiler import compile_model
from moec.runtime import load_build

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(n_head=2, n_embd=32, vocab_size=64, block_size=32)
DEEP = 12  # layers h.10 and h.11 too: names past one digit


def _build(tmp_path, name, example="gpt.py", **options) -> Path:
    out = tmp_path / name
    compile_model(str(ROOT / "examples" / example), str(out), Options(**options).validate(), log=lambda s: None)
    return out


def _load(build: Path) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location(f"program_{build.name}", build / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return load_build(module.Model, build)


@pytest.fixture(scope="module")
def depths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("depth")
    return {n: _build(tmp, f"gpt{n}", experts=4, topk=2, overrides={**TINY, "n_layer": n}) for n in (2, DEEP)}


def test_length_does_not_grow_with_depth_and_both_verify(depths):
    lines = {n: len((b / "model.py").read_text().splitlines()) for n, b in depths.items()}
    assert lines[DEEP] == lines[2], lines  # nothing in model.py is written once a layer
    for b in depths.values():
        assert json.loads((b / "config.json").read_text())["result"]["verify_max_rel_error"] <= 1e-4


def test_one_class_per_block_built_for_every_layer(depths):
    src = (depths[DEEP] / "model.py").read_text()
    classes = re.findall(r"^class (\w+)\(", src, re.M)
    assert classes == ["Block", "HStack", "Model"]
    model = _load(depths[DEEP])
    assert len(model.h) == DEEP and {type(layer).__name__ for layer in model.h} == {"Block"}
    assert "getattr(self" not in src


def test_loads_the_same_weights_under_the_users_names(depths):
    model = _load(depths[2])
    saved = load_file(str(depths[2] / "weights.safetensors"))
    recipe = json.loads((depths[2] / "upcycle.json").read_text())
    experts = recipe["experts"]
    assert set(model.state_dict()) == set(saved) - set(recipe["sources"]) | set(experts)
    assert "h.1.attn.c_attn.weight" in saved and "h.1.mlp.moe.experts.w1" in experts


def test_imports_are_used_literals_named_and_tensor_lines_shaped(depths):
    src = (depths[2] / "model.py").read_text()
    tree = ast.parse(src)
    imported = {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert imported <= used, imported - used
    norms = [line for line in src.splitlines() if "aten.layer_norm" in line]
    assert norms and all("eps=1e-05" in line for line in norms)
    linears = [line for line in src.splitlines() if "= torch.ops.aten.linear" in line]
    assert linears and all(re.search(r"  # \[[^\]]+\]$", line) for line in linears)
    assert "[B, T, 32]" in src


def test_mixed_layers_run_in_one_loop_and_verify(tmp_path):
    build = _build(tmp_path, "mixed", experts=4, topk=2, first_dense=1, moe_every=2,
                   overrides={**TINY, "n_layer": 6})
    src = (build / "model.py").read_text()
    assert re.findall(r"^class (\w+)\(", src, re.M) == ["Block", "Block2", "HStack", "Model"]
    assert json.loads((build / "config.json").read_text())["result"]["verify_max_rel_error"] <= 1e-4
    model = _load(build)
    out = model(torch.randint(0, 64, (2, 8)))
    assert len(out["expert_counts"]) == 3  # layers 1, 3, 5


def test_dropout_follows_eval(tmp_path):
    build = _build(tmp_path, "dropout", experts=4, topk=2, overrides={**TINY, "n_layer": 2, "dropout": 0.5})
    model = _load(build)
    x = torch.randint(0, 64, (2, 8))
    model.eval()
    assert torch.equal(model(x)["logits"], model(x)["logits"])
    model.train()
    assert not torch.equal(model(x)["logits"], model(x)["logits"])


REGIONS = '''
import torch


class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.proj = torch.nn.Embedding(8, 8), torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        h = self.emb(x)
        with torch.autocast("cpu", enabled=False):  # export keeps these as modules called in their mode
            y = h.float() @ h.float().transpose(-1, -2)
        with torch.no_grad():
            z = y * 2
        h = h + z.sum(-1, keepdim=True)
        return h + self.proj(torch.relu(self.fc(h)))


def build_model(config=None):
    return M()
'''


def test_autocast_and_no_grad_regions_are_emitted_and_verify(tmp_path):
    (tmp_path / "regions.py").write_text(REGIONS)
    out = tmp_path / "b"
    compile_model(str(tmp_path / "regions.py"), str(out), Options(experts=4, topk=2).validate(), log=lambda s: None)
    src = (out / "model.py").read_text()
    assert "wrap_with_autocast" in src and "wrap_with_set_grad_enabled" in src
    assert len(re.findall(r"^class \w+Region\(", src, re.M)) == 2 and "device(type=" not in src
    assert json.loads((out / "config.json").read_text())["result"]["verify_max_rel_error"] <= 1e-4


STAGED_REGION = '''
import torch


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.proj = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

    def forward(self, x, scale):
        return x + self.proj(torch.relu(self.fc(x))) * scale


class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)
        self.layers = torch.nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        h = self.emb(x)
        position = torch.arange(x.shape[1], device=x.device)
        with torch.autocast("cpu", enabled=False):  # as rotary tables are made: before the layers, from sizes
            scale = torch.sigmoid(position.float()[:, None] / 8)
        for layer in self.layers:
            h = layer(h, scale)
        return self.head(h)


def build_model(config=None):
    return M()
'''


def test_a_region_before_the_layers_is_made_again_on_every_stage(tmp_path):
    (tmp_path / "staged.py").write_text(STAGED_REGION)
    out = tmp_path / "b"
    lines = []
    compile_model(str(tmp_path / "staged.py"), str(out), Options(experts=4, topk=2, pp=2).validate(),
                  log=lines.append)
    stages = (out / "stages.py").read_text()
    assert all("wrap_with_autocast" in stage for stage in stages.split("class Stage")[1:])
    assert any("the stages run in a row give model.py's logits" in line for line in lines), lines


def test_a_device_fixed_inside_a_region_without_tensors_is_one_line(tmp_path):
    made = "torch.arange(x.shape[1], device=x.device)"
    src = STAGED_REGION.replace(f"        position = {made}\n", "").replace("(position.float()", f"({made}.float()")
    (tmp_path / "fixed.py").write_text(src)
    with pytest.raises(MoecError, match=r"inside an autocast or no_grad region that takes no tensor, so the trace "
                                        r"fixed the device: make it before the region and pass it in"):
        compile_model(str(tmp_path / "fixed.py"), str(tmp_path / "b"), Options(experts=4, topk=2).validate(),
                      log=lambda s: None)
