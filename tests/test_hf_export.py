"""`moec export`: tiny Hugging Face Llama, Qwen2 and Qwen3 directories compile, train 3 steps and export to
the MoE formats that can express their options; transformers loads each export with no key missing or
left over and computes the trained model's logits. The export of a PP2 run's checkpoint, and of a TP2 x EP2
run's, is byte-identical to that of the same weights written by one process, in either layout. What a format cannot
express is one line naming the option and the formats that can."""
import json
import math
import shutil

import pytest
import torch

from tests.hf_checkpoints import EXAMPLES, load_program, save_tiny
from tests.train.conftest import run_train
from tests.invoke import one_line, run

NO_BIAS = ["--expert-bias-rate", "0"]  # the formats choose experts without a selection bias
TRAIN = ["--log-every", "1", "--eval-every", "0"]


def compile_dir(tmp_path, family, *args):
    build = tmp_path / f"{family}-build"
    r = run("compile", save_tiny(family, tmp_path / family), "--experts", "4", "--topk", "2", "-o", build, *args)
    assert r.exit_code == 0, r.output
    return build


def train(build, run_dir, *args, nproc=1):
    r = run_train(build, *TRAIN, *args, run_dir=run_dir, nproc=nproc, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [row["loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in row]
    assert losses and all(math.isfinite(x) for x in losses)


def transformers_logits(export, ids):
    """The export as transformers loads it (every key used, none missing), on ids."""
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return model.eval()(input_ids=ids, use_cache=False).logits


def assert_same_logits(build, weights, export):
    ids = torch.randint(0, 256, (3, 40))
    with torch.no_grad():
        want = load_program(build, weights)(ids)["logits"]
    got = transformers_logits(export, ids)
    assert (got - want).abs().max() / want.abs().max() < 1e-5


def test_llama_trains_and_exports_to_mixtral(tmp_path):
    build = compile_dir(tmp_path, "llama", *NO_BIAS)
    train(build, tmp_path / "run", "--steps", "3", "--ckpt-every", "3")
    final = tmp_path / "final"
    r = run("export", tmp_path / "run", "--format", "mixtral", "-o", final)
    assert r.exit_code == 0 and "final.safetensors" in r.output, r.output
    config = json.loads((final / "config.json").read_text())
    assert (config["model_type"], config["num_local_experts"], config["num_experts_per_tok"]) == ("mixtral", 4, 2)
    assert_same_logits(build, tmp_path / "run" / "final.safetensors", final)
    # the run's checkpoint (the one-process layout) holds the same weights: the same bytes come out
    r = run("export", tmp_path / "run", "--step", "3", "--format", "mixtral", "-o", tmp_path / "ckpt")
    assert r.exit_code == 0, r.output
    for name in ("config.json", "model.safetensors"):
        assert (final / name).read_bytes() == (tmp_path / "ckpt" / name).read_bytes()
    for other in ("qwen2_moe", "qwen3_moe"):  # whose attention a Llama does not have
        assert "formats that can: mixtral" in one_line(run("export", build, "--format", other, "-o", tmp_path / other))


def test_qwen2_with_shared_experts_a_dense_layer_fine_experts_and_scaled_weights_exports_to_qwen2_moe(tmp_path):
    build = compile_dir(tmp_path, "qwen2", *NO_BIAS, "--shared-experts", "1", "--first-dense", "1",
                        "--granularity", "2", "--router-weights", "scaled")
    train(build, tmp_path / "run", "--steps", "3", "--ckpt-every", "0")
    export = tmp_path / "export"
    assert run("export", tmp_path / "run", "--format", "qwen2_moe", "-o", export).exit_code == 0
    config = json.loads((export / "config.json").read_text())
    assert config["mlp_only_layers"] == [0] and config["num_experts"] == 8 and config["num_experts_per_tok"] == 4
    assert config["moe_intermediate_size"] == config["shared_expert_intermediate_size"] == 176
    assert config["norm_topk_prob"] is False
    assert_same_logits(build, tmp_path / "run" / "final.safetensors", export)
    for other in ("mixtral", "qwen3_moe"):
        line = one_line(run("export", build, "--format", other, "-o", tmp_path / other))
        assert line == f"error: --shared-experts: {other} cannot express it; formats that can: qwen2_moe, deepseek_v3"


# transformers initialises the width-0 shared expert of a qwen2_moe export without shared experts, and says
# that doing so to a zero-element tensor is a no-op
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op:UserWarning")
@pytest.mark.parametrize("family,fmt,args", [("qwen3", "qwen3_moe", ["--moe-every", "2"]),
                                              ("qwen2", "qwen2_moe", [])])
def test_qwen3_exports_with_a_dense_layer_and_qwen2_without_shared_experts(tmp_path, family, fmt, args):
    build = compile_dir(tmp_path, family, *NO_BIAS, "--no-verify", *args)
    assert run("export", build, "--format", fmt, "-o", tmp_path / "export").exit_code == 0
    assert_same_logits(build, None, tmp_path / "export")


@pytest.mark.parametrize("plan,nproc", [(["--pp", "2"], 2), (["--tp", "2", "--ep", "2"], 4)], ids=["pp2", "tp2xep2"])
def test_a_sharded_runs_checkpoint_exports_as_one_process_writes_the_same_weights(tmp_path, plan, nproc):
    """A checkpoint of a pipeline's stages (PP2: each rank holds half the layers), or of TP2 x EP2 (attention and
    dense weights split in slices over 2 ranks, the experts over 2 others), exports the bytes of the same
    weights written by one process."""
    build = compile_dir(tmp_path, "llama", *NO_BIAS, *plan, "--no-verify")
    run_dir = tmp_path / "run"
    train(build, run_dir, "--steps", "2", "--ckpt-every", "2", nproc=nproc)
    assert not (run_dir / "final.safetensors").exists()  # no rank holds every weight
    assert run("export", run_dir, "--format", "mixtral", "-o", tmp_path / "sharded").exit_code == 0
    # one process resumes it for a step whose learning rate leaves every fp32 weight as it is, and writes the
    # weights twice: final.safetensors, and a checkpoint holding every weight
    train(build, run_dir, "--steps", "3", "--resume", "--lr", "1e-300", "--ckpt-every", "3")
    assert run("export", run_dir, "--format", "mixtral", "-o", tmp_path / "final").exit_code == 0
    assert run("export", run_dir, "--step", "3", "--format", "mixtral", "-o", tmp_path / "one").exit_code == 0
    assert run("export", build, "--format", "mixtral", "-o", tmp_path / "untrained").exit_code == 0
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes()
               for name in ("sharded", "final", "one", "untrained")}
    assert weights["sharded"] == weights["final"] == weights["one"] != weights["untrained"]
    assert_same_logits(build, run_dir / "final.safetensors", tmp_path / "sharded")


@pytest.fixture(scope="module")
def llama_build(tmp_path_factory):
    """A tiny Llama build with the defaults (a calibrated selection bias)."""
    tmp = tmp_path_factory.mktemp("export")
    build = tmp / "build"
    r = run("compile", save_tiny("llama", tmp / "llama"), "--experts", "4", "--topk", "2", "--no-verify", "-o", build)
    assert r.exit_code == 0, r.output
    return build


def test_a_selection_bias_is_refused_unless_dropped(tmp_path, llama_build):
    line = one_line(run("export", llama_build, "--format", "mixtral", "-o", tmp_path / "e"))
    assert "model.model.layers.0.mlp.moe.router.bias is not zero: mixtral chooses experts without a selection " \
           "bias; compile with --expert-bias-rate 0, or export with --drop-bias" in line
    assert not (tmp_path / "e").exists()
    r = run("export", llama_build, "--format", "mixtral", "-o", tmp_path / "e", "--drop-bias")
    assert r.exit_code == 0 and "layer 0's selection bias" in r.output and "layer 1's selection bias" in r.output


def _with_options(tmp_path, build, **options):
    """A copy of build whose config.json records other options (what export reads before any weight)."""
    copy = tmp_path / "edited"
    shutil.copytree(build, copy)
    config = json.loads((copy / "config.json").read_text())
    config["options"].update(options)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


NONE = "no export format expresses it (mixtral, qwen2_moe, qwen3_moe, deepseek_v3 cannot)"


@pytest.mark.parametrize("options,message", [
    (dict(router="sigmoid"), "--router sigmoid: mixtral cannot express it; formats that can: deepseek_v3"),
    (dict(pyramid=[8, 1]), "--pyramid (one expert count for every layer): " + NONE),
    (dict(hash_layers=[0]), "--hash-layers: " + NONE),
    (dict(capacity_factor=1.25), "--capacity-factor (the formats drop no tokens): " + NONE),
    (dict(first_dense=1), "--first-dense (dense layers before the MoE layers): mixtral cannot express it; formats "
                          "that can: qwen2_moe, qwen3_moe, deepseek_v3"),
    (dict(moe_every=2), "--moe-every (dense layers between MoE layers): mixtral cannot express it; formats that "
                        "can: qwen2_moe, qwen3_moe"),
    (dict(router_weights="scaled"), "--router-weights scaled: mixtral cannot express it; formats that can: "
                                    "qwen2_moe, qwen3_moe"),
])
def test_an_inexpressible_option_is_one_line_naming_the_formats_that_can(tmp_path, llama_build, options, message):
    line = one_line(run("export", _with_options(tmp_path, llama_build, **options), "--format", "mixtral",
                        "-o", tmp_path / "e"))
    assert line == f"error: {message}"
    assert not (tmp_path / "e").exists()


def test_a_dense_deepseek_v3_upcycled_with_sigmoid_routing_exports_to_deepseek_v3(tmp_path, llama_build):
    """Its selection bias (calibrated: not zero) becomes e_score_correction_bias; noisy experts make the
    routing decide the logits."""
    from safetensors import safe_open

    build = compile_dir(tmp_path, "deepseek_v3", "--router", "sigmoid", "--shared-experts", "1", "--first-dense",
                        "1", "--granularity", "2", "--upcycle-noise", "0.5", "--no-verify")
    export = tmp_path / "export"
    assert run("export", build, "--format", "deepseek_v3", "-o", export).exit_code == 0
    config = json.loads((export / "config.json").read_text())
    assert {k: config[k] for k in ("first_k_dense_replace", "n_routed_experts", "num_experts_per_tok",
                                   "n_shared_experts", "moe_intermediate_size", "norm_topk_prob",
                                   "routed_scaling_factor", "n_group", "topk_group")} == dict(
        first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=4, n_shared_experts=1,
        moe_intermediate_size=64, norm_topk_prob=True, routed_scaling_factor=1.0, n_group=1, topk_group=1)
    with safe_open(str(export / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").abs().sum() > 0
    assert_same_logits(build, None, export)
    line = one_line(run("export", build, "--format", "mixtral", "-o", tmp_path / "e"))
    assert line == "error: --router sigmoid: mixtral cannot express it; formats that can: deepseek_v3"
    line = one_line(run("export", _with_options(tmp_path, build, moe_every=2), "--format", "deepseek_v3",
                        "-o", tmp_path / "e"))
    assert line == ("error: --moe-every (dense layers between MoE layers): deepseek_v3 cannot express it; "
                    "formats that can: qwen2_moe, qwen3_moe")
    line = one_line(run("export", llama_build, "--format", "deepseek_v3", "-o", tmp_path / "e"))
    assert line == ("error: --router softmax (the default): deepseek_v3 cannot express it; formats that can: "
                    "mixtral, qwen2_moe, qwen3_moe")
    assert not (tmp_path / "e").exists()


def test_a_build_of_a_model_file_without_transformers_is_refused(tmp_path):
    build = tmp_path / "gpt"
    assert run("compile", EXAMPLES / "gpt.py", "--experts", "4", "--no-verify", "-o", build).exit_code == 0
    assert "not compiled from a Hugging Face model" in one_line(run("export", build, "--format", "mixtral",
                                                                    "-o", tmp_path / "e"))


def test_a_leftover_tensor_is_named(tmp_path, llama_build):
    from safetensors.torch import load_file, save_file

    edited = _with_options(tmp_path, llama_build, expert_bias_rate=0.0)
    weights, recipe_file = edited / "weights.safetensors", edited / "upcycle.json"
    state = load_file(str(weights))
    state = {k: v for k, v in state.items() if not k.endswith("router.bias")}
    save_file({**state, "model.model.layers.0.extra": torch.zeros(2)}, str(weights))
    line = one_line(run("export", edited, "--format", "mixtral", "-o", tmp_path / "e"))
    assert line == "error: model.model.layers.0.extra: a tensor of the checkpoint that mixtral has no place for"
    save_file(state, str(weights))
    recipe = json.loads(recipe_file.read_text())
    experts = recipe["experts"]
    del experts["model.model.layers.1.mlp.moe.experts.w3"]
    recipe_file.write_text(json.dumps(recipe))
    line = one_line(run("export", edited, "--format", "mixtral", "-o", tmp_path / "e"))
    assert "layer 1's experts are not gated (no experts.w3)" in line
    del state["model.model.norm.weight"]
    save_file(state, str(weights))
    experts["model.model.layers.1.mlp.moe.experts.w3"] = experts["model.model.layers.1.mlp.moe.experts.w1"]
    recipe_file.write_text(json.dumps(recipe))
    line = one_line(run("export", edited, "--format", "mixtral", "-o", tmp_path / "e"))
    assert line == "error: the checkpoint lacks model.model.norm.weight, which the exported model needs"


def test_the_output_directory_is_replaced_only_when_moec_wrote_it(tmp_path, llama_build):
    out = tmp_path / "e"
    args = ("export", llama_build, "--format", "mixtral", "--drop-bias", "-o", out)
    assert run(*args).exit_code == 0
    assert "exists and is not empty; pass --force" in one_line(run(*args))
    assert run(*args, "--force").exit_code == 0
    (out / "notes.txt").write_text("mine")
    assert "holds notes.txt, which moec did not write" in one_line(run(*args, "--force"))
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    assert "has no moec_export.json; it is left as it is" in one_line(run(*args[:-1], mine, "--force"))
    assert (mine / "config.json").read_text() == "{}"


def test_an_fsdp_runs_checkpoint_exports_as_its_final_weights(tmp_path):
    """FSDP2 shards every parameter over the ranks (DTensors in the whole-state layout): the checkpoint
    exports the bytes of the final.safetensors rank 0 gathers."""
    build = compile_dir(tmp_path, "llama", *NO_BIAS, "--no-verify")
    run_dir = tmp_path / "run"
    train(build, run_dir, "--steps", "2", "--ckpt-every", "2", "--fsdp", nproc=2)
    r = run("export", run_dir, "--format", "mixtral", "-o", tmp_path / "final")
    assert r.exit_code == 0 and "final.safetensors" in r.output, r.output
    assert run("export", run_dir, "--step", "2", "--format", "mixtral", "-o", tmp_path / "ckpt").exit_code == 0
    final, ckpt = ((tmp_path / name / "model.safetensors").read_bytes() for name in ("final", "ckpt"))
    assert final == ckpt
