"""Upcycling at load time: a build stores the dense weights once with a recipe, and each rank makes only the
experts it holds, the same ones whatever the EP size."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moec.driver import compiler
from moec.driver.capture import build
from moec.runtime import load_build
from moec.runtime.kernels.generated import import_file
from moec.runtime.upcycle import dropped_units, entry, make_expert, make_experts
from tests.hf_checkpoints import EXAMPLES
from tests.invoke import one_line, run


def _dense_checkpoint(path):
    """The tiny llama's weights in bf16, as a dense checkpoint often comes."""
    mod = import_file("llama_for_upcycle", EXAMPLES / "llama.py")
    torch.manual_seed(3)
    state = {n: t.to(torch.bfloat16).contiguous() for n, t in mod.build_model().state_dict().items()}
    save_file(state, str(path))
    return state


@pytest.fixture(scope="module")
def noisy_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upcycle")
    dense = _dense_checkpoint(tmp / "dense.safetensors")
    build = tmp / "build"
    r = run("compile", EXAMPLES / "llama.py", "--experts", "4", "--topk", "2", "--granularity", "2",
            "--shared-experts", "2", "--upcycle-noise", "0.05", "--drop-upcycle", "0.25",
            "--weights", tmp / "dense.safetensors", "--no-verify", "-o", build)
    assert r.exit_code == 0, r.output
    return build, tmp / "dense.safetensors", dense


def _model_class(build):
    return import_file(f"upcycled_{build.name}", build / "model.py").Model


def _experts(model, group="experts"):
    return {n: p.detach() for n, p in model.named_parameters() if f".{group}." in n}


def test_each_ep_rank_makes_its_slice_of_the_one_process_experts(noisy_build):
    build = noisy_build[0]
    Model = _model_class(build)
    whole = _experts(load_build(Model, build))
    ranks = [_experts(load_build(Model, build, "cpu", 2, j)) for j in range(2)]
    assert whole
    for name, t in whole.items():
        assert ranks[0][name].shape[0] == ranks[1][name].shape[0] == t.shape[0] // 2
        assert torch.equal(torch.cat([ranks[0][name], ranks[1][name]]), t), name
    again = _experts(load_build(Model, build))
    assert all(torch.equal(again[n], t) for n, t in whole.items())  # the seeds, not the process, decide
    shared = _experts(load_build(Model, build), "shared")
    assert shared and all(torch.equal(_experts(load_build(Model, build, "cpu", 2, 1), "shared")[n], t)
                          for n, t in shared.items())  # every rank holds them whole


def test_the_build_stores_the_dense_weights_once_in_their_dtype(noisy_build):
    build, checkpoint, dense = noisy_build
    with safe_open(str(build / "weights.safetensors"), framework="pt") as f:
        stored = {n: f.get_slice(n) for n in f.keys()}
    assert not any(".experts." in n or ".shared." in n for n in stored)
    assert all(stored[n].get_dtype() == "BF16" for n in dense)
    recipe = json.loads((build / "upcycle.json").read_text())
    assert {e["source"] for e in recipe["experts"].values()} <= set(recipe["sources"]) <= set(dense)
    size, model_bytes = (build / "weights.safetensors").stat().st_size, checkpoint.stat().st_size
    assert size <= 1.1 * model_bytes
    moe = json.loads((build / "config.json").read_text())["result"]["moe_weights_bytes"]
    assert moe > 2 * size  # what the build used to hold


def test_noise_and_dropped_units_follow_the_recipe(noisy_build):
    build, _, dense = noisy_build
    recipe = json.loads((build / "upcycle.json").read_text())["experts"]
    w1 = recipe["layers.0.feed_forward.moe.experts.w1"]
    assert w1["noise"] > 0 and w1["drop"] == round(0.25 * dense["layers.0.feed_forward.w1.weight"].shape[0])
    experts = _experts(load_build(_model_class(build), build))["layers.0.feed_forward.moe.experts.w1"]
    assert not torch.equal(experts[0], experts[2])  # two coarse experts: their own draws


def _entry(role="w1", drop=0, noise=0.0, M=2):
    return entry("w", [0, None], False, role, 4, M, 1.0, 7, drop, 0.0, 1.0, noise)


def test_dropped_units_are_one_set_per_coarse_expert_for_all_its_matrices():
    F, D = 16, 6
    w1, w2 = torch.randn(F, D), torch.randn(D, F)
    e1, e2 = _entry("w1", drop=4), _entry("w2", drop=4)
    for b in range(4):
        units = dropped_units(e1, b, F)
        assert len(units) == 4 and torch.equal(units, dropped_units(e2, b, F))
        coarse1 = torch.cat([make_expert(e1, w1, b * 2 + s) for s in range(2)])  # [F, D]
        coarse2 = torch.cat([make_expert(e2, w2, b * 2 + s) for s in range(2)], dim=1)  # [D, F]
        changed1 = (coarse1 != w1).any(1).nonzero().flatten()
        changed2 = (coarse2 != w2).any(0).nonzero().flatten()
        assert torch.equal(changed1, units) and torch.equal(changed2, units)
    assert not torch.equal(dropped_units(e1, 0, F), dropped_units(e1, 1, F))


def test_a_slice_of_experts_is_the_same_whichever_slice_it_is_made_in():
    w = torch.randn(12, 5)
    e = _entry("w1", drop=3, noise=0.1)
    whole = make_experts(e, w, range(8))
    assert torch.equal(torch.cat([make_experts(e, w, range(j * 2, j * 2 + 2)) for j in range(4)]), whole)
    assert not torch.equal(whole[0], whole[1])  # noise of its own per fine expert


def test_a_checkpoint_streamed_into_the_build_gives_the_build_made_from_the_model_in_memory(tmp_path, monkeypatch):
    """With --weights the dense model is never made: the graph stays on the meta device, calibration reads each
    weight when its node runs, and each tensor goes from the checkpoint into the build alone. Given the
    weights the model file's own initialisation makes (seed 0, as compile seeds it), the build is the one
    compiled from that model in memory, routers (calibrated, with their balancing biases) and recipe alike."""
    mod = import_file("llama_streamed", EXAMPLES / "llama.py")
    torch.manual_seed(0)
    save_file({n: t.contiguous() for n, t in mod.build_model().state_dict().items()}, str(tmp_path / "d.safetensors"))
    options = ["--experts", "4", "--topk", "2", "--granularity", "2", "--drop-upcycle", "0.25", "--no-verify"]
    built = []  # the devices the compile builds the model on
    monkeypatch.setattr(compiler, "build", lambda *a: built.append(a[-1]) or build(*a))
    for given in ([], ["--weights", tmp_path / "d.safetensors"]):
        built.clear()
        r = run("compile", EXAMPLES / "llama.py", *options, *given, "-o", tmp_path / f"b{len(given)}")
        assert r.exit_code == 0, r.output
    assert "cpu" not in built and "meta" in built  # the streamed compile never made the dense weights
    for name in ("weights.safetensors", "upcycle.json"):
        assert (tmp_path / "b0" / name).read_bytes() == (tmp_path / "b2" / name).read_bytes(), name
    with safe_open(str(tmp_path / "b2" / "weights.safetensors"), framework="pt") as f:
        bias = f.get_tensor("layers.0.feed_forward.moe.router.bias")
    assert bias.abs().sum() > 0  # balanced on calibration tokens run through the streamed weights


def test_a_build_may_reference_the_dense_checkpoint_by_its_sha256(tmp_path, noisy_build):
    """--reference-weights: the build holds the routers and a record of the checkpoint's file (path, size,
    SHA-256) instead of copies of its tensors (so --max-weights-gb, which bounds the copies, does not refuse a
    checkpoint over it), and loads the same model from it; a changed or moved checkpoint is one line at load."""
    import shutil

    from moec.base.errors import MoecError

    copied, checkpoint, dense = noisy_build
    mine = tmp_path / "dense.safetensors"
    shutil.copyfile(checkpoint, mine)
    build = tmp_path / "build"
    r = run("compile", EXAMPLES / "llama.py", "--experts", "4", "--topk", "2", "--granularity", "2",
            "--shared-experts", "2", "--upcycle-noise", "0.05", "--drop-upcycle", "0.25",
            "--weights", mine, "--reference-weights", "--max-weights-gb", "0.001", "--no-verify", "-o", build)
    assert r.exit_code == 0, r.output
    with safe_open(str(build / "weights.safetensors"), framework="pt") as f:
        assert not set(f.keys()) & set(dense) and any(".router." in n for n in f.keys())
    record = json.loads((build / "dense.json").read_text())
    assert list(record["files"]) == [str(mine.resolve())] and set(record["tensors"]) == set(dense)
    Model = _model_class(build)
    want = load_build(_model_class(copied), copied).state_dict()
    got = load_build(Model, build).state_dict()
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    raw = bytearray(mine.read_bytes())
    raw[-1] ^= 1
    mine.write_bytes(bytes(raw))
    with pytest.raises(MoecError, match="which has changed since the compile"):
        load_build(Model, build)
    mine.unlink()
    with pytest.raises(MoecError, match="which does not exist; put the checkpoint back"):
        load_build(Model, build)
    line = one_line(run("compile", EXAMPLES / "llama.py", "--reference-weights", "-o", tmp_path / "b2"))
    assert "--reference-weights: the build names the dense checkpoint's safetensors files" in line
