"""A Hugging Face checkpoint directory as `moec compile`'s model, and as --weights of a model file: tiny
Llama and Qwen2 saved in several shards compile to a build whose model.py computes the transformers
model's logits (tests/test_hf_export.py trains such builds); a damaged directory is one line naming what
is wrong."""
import json
import shutil

import pytest
import torch

from tests.hf_checkpoints import EXAMPLES, hf_logits, load_program, save_tiny
from tests.invoke import one_line, run


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_sharded_directory_compiles_to_the_transformers_models_logits(tmp_path, family):
    directory = save_tiny(family, tmp_path / family)
    assert len(list(directory.glob("model-*.safetensors"))) > 2  # several shards, read one by one
    build = tmp_path / "build"
    r = run("compile", directory, "--experts", "4", "--topk", "2", "-o", build)
    assert r.exit_code == 0, r.output
    config = json.loads((build / "config.json").read_text())
    assert config["result"]["verify_max_rel_error"] < 1e-4 and config["hf_config"]["model_type"] == family
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        got = load_program(build)(ids)["logits"]
    want = hf_logits(directory, ids)  # the checkpoint's own weights, loaded by transformers
    assert (got - want).abs().max() / want.abs().max() < 1e-5


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("hf") / "llama", seed=1)


@pytest.mark.parametrize("given", ["directory", "index"])
def test_weights_of_a_model_file_from_a_directory_or_its_index(tmp_path, llama_dir, given):
    weights = llama_dir if given == "directory" else llama_dir / "model.safetensors.index.json"
    build = tmp_path / "b"
    r = run("compile", EXAMPLES / "hf_models.py", "--config", "llama", "--weights", weights, "--experts", "4",
            "--topk", "2", "--no-verify", "-o", build)  # checked against transformers below
    assert r.exit_code == 0, r.output
    _assert_same_logits(build, llama_dir)


def _assert_same_logits(build, hf_dir):
    """The build's program, holding its own weights, gives the transformers model's logits."""
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        got = load_program(build)(ids)["logits"]
    want = hf_logits(hf_dir, ids)
    assert (got - want).abs().max() / want.abs().max() < 1e-5


def _edit_index(directory, edit):
    index = directory / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    edit(content["weight_map"])
    index.write_text(json.dumps(content))


def _shard_of(d, name):
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]


def _drop_shard(d):
    (d / _shard_of(d, "model.norm.weight")).unlink()


def _forget(name):
    return lambda d: _edit_index(d, lambda m: m.pop(name))


def _misplace(name):
    return lambda d: _edit_index(d, lambda m: m.update({name: _shard_of(d, "model.embed_tokens.weight")}))


def _extra(d):
    from safetensors.torch import save_file
    save_file({"model.layers.0.mlp.extra.weight": torch.zeros(2)}, d / "extra.safetensors")
    _edit_index(d, lambda m: m.update({"model.layers.0.mlp.extra.weight": "extra.safetensors"}))


def _widen(d):
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] += 8
    (d / "config.json").write_text(json.dumps(config))


DAMAGE = [
    (_drop_shard, "that model.safetensors.index.json lists (for model."),
    (_widen, "weights do not match the model: model.layers.0.mlp.gate_proj.weight is (352, 128), the model's "
             "(360, 128) (and 5 more)"),
    (_forget("model.norm.weight"), "missing (the model has, the weights lack) model.norm.weight"),
    (_extra, "unexpected (the weights hold, the model lacks) model.layers.0.mlp.extra.weight"),
    (_misplace("model.norm.weight"), "the index puts model.norm.weight in model-0"),
    (lambda d: (d / "model.safetensors.index.json").unlink(), "without model.safetensors or "
                                                              "model.safetensors.index.json"),
]


@pytest.mark.parametrize("damage,message", DAMAGE)
def test_a_damaged_directory_is_one_line_naming_what_is_wrong(tmp_path, llama_dir, damage, message):
    directory = tmp_path / "llama"
    shutil.copytree(llama_dir, directory)
    damage(directory)
    line = one_line(run("compile", directory, "-o", tmp_path / "new" / "out", "--experts", "4", "--no-verify"))
    assert line.startswith(f"error: {directory}: ") and message in line, line
    assert not (tmp_path / "new").exists()  # nor the directory made on the way to the output


def test_config_and_a_build_given_as_the_model_are_refused(tmp_path, llama_dir):
    assert "drop --config" in one_line(run("compile", llama_dir, "--config", "7b", "-o", tmp_path / "o"))
    assert "has no field 'nope'" in one_line(run("compile", llama_dir, "--set", "nope=1", "-o", tmp_path / "o"))
    build = tmp_path / "b"
    assert run("compile", llama_dir, "--experts", "4", "--no-verify", "--stop-after", "find_ffn",
               "-o", build).exit_code == 0
    assert "is a build moec wrote" in one_line(run("compile", build, "-o", tmp_path / "o"))


def test_a_base_models_checkpoint_loads_into_the_causal_lm_as_transformers_reads_it(tmp_path):
    """As the Hub's GPT-2: names without the base model's prefix (h.0..., not transformer.h.0...), no lm_head
    (tied to the embedding), and a causal-mask buffer the model ignores on load."""
    import transformers
    from safetensors.torch import save_file

    from tests.hf_checkpoints import FAMILIES

    cls, kwargs = FAMILIES["gpt2"]
    torch.manual_seed(0)
    directory = tmp_path / "gpt2"
    transformers.GPT2Model(getattr(transformers, cls)(**kwargs)).save_pretrained(directory, max_shard_size="200KB")
    save_file({"h.0.attn.bias": torch.ones(1, 1, 8, 8)}, directory / "masks.safetensors")
    _edit_index(directory, lambda m: m.update({"h.0.attn.bias": "masks.safetensors"}))
    build = tmp_path / "build"
    r = run("compile", directory, "--experts", "4", "--topk", "2", "-o", build)
    assert r.exit_code == 0, r.output
    _assert_same_logits(build, directory)
