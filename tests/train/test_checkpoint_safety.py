"""Checkpointer on a small model: crafted checkpoints run no code, damaged manifests,
other models' checkpoints and ones that do not fit are skipped, load_latest(at_most),
pruning that keeps this model's intact checkpoints, and a full disk."""
import errno
import json
import os
import pickle
import shutil
import socket
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict

from moec.base.errors import MoecError
from moec.runtime.training import checkpoint as ck
from moec.runtime.training.checkpoint import Checkpointer, verify


def _trained(width=8, layers=2, steps=1, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width))[:layers]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(steps):
        model(torch.randn(3, width)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _fresh(width=8, layers=2):
    model = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width))[:layers]
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _state(model, optimizer):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()])


def _same(a, b):
    (ma, oa), (mb, ob) = a, b
    return ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma) and len(oa) == len(ob) and all(
        torch.equal(x[k], y[k]) for x, y in zip(oa, ob) for k in x)


def _reseal(path):
    """Recompute path's manifest from its files, as a crafted checkpoint would."""
    manifest = json.loads((path / ck.MANIFEST).read_text())
    files = sorted(f for f in path.iterdir() if f.is_file() and f.name != ck.MANIFEST)
    manifest["files"] = {f.name: [f.stat().st_size, ck._sha256(f)] for f in files}
    (path / ck.MANIFEST).write_text(json.dumps(manifest))
    assert verify(path) is None


class _MakesDir:
    """Unpickling it creates the directory `marker`: a stand-in for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_metadata_that_runs_code_is_skipped(tmp_path):
    ckpt, lines, marker = Checkpointer(tmp_path / "ckpts"), [], tmp_path / "ran"
    model, optimizer = _trained()
    ckpt.save(1, model, optimizer, {})
    good = _state(model, optimizer)
    ckpt.save(2, *_trained(steps=2), {})
    crafted = tmp_path / "ckpts" / "step_00000002"
    metadata = pickle.loads((crafted / ".metadata").read_bytes())  # ours, before crafting
    metadata.planner_data = _MakesDir(marker)
    (crafted / ".metadata").write_bytes(pickle.dumps(metadata))
    _reseal(crafted)

    model, optimizer = _fresh()
    state = ckpt.load_latest(model, optimizer, log=lines.append)
    assert not marker.exists()
    assert state["path"].name == "step_00000001" and _same(_state(model, optimizer), good)
    assert lines == ["checkpoint step_00000002 is damaged (UnpicklingError: os.makedirs is not allowed in "
                     "checkpoint metadata); trying an older one"]
    pickle.loads((crafted / ".metadata").read_bytes())  # what plain pickle.load, DCP's reader, does
    assert marker.exists()


def test_a_non_tensor_item_that_runs_code_is_refused(tmp_path):
    # DCP reads non-tensor items (here an LR) with torch.load(weights_only=False)
    ckpt, marker = Checkpointer(tmp_path), tmp_path / "ran"
    model, optimizer = _trained()
    path = ckpt.save(1, model, optimizer, {})
    msd, osd = get_state_dict(model, optimizer)
    osd["param_groups"][0]["lr"] = _MakesDir(marker)
    with warnings.catch_warnings():  # torch warns that it writes into a checkpoint, which is the point here
        warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path), no_dist=True)
    _reseal(path)
    with pytest.raises(MoecError, match="loading checkpoint .*step_00000001 failed .*UnpicklingError"):
        ckpt.load_latest(*_fresh(), log=lambda m: None)
    assert not marker.exists()


@pytest.mark.parametrize("manifest", [{}, {"step": 2}, {"files": []}, {"files": {}}, {"files": {"x": 3}},
                                      {"files": {".metadata": ["7", "ab"]}}, []])
def test_a_manifest_without_its_files_is_damaged(tmp_path, manifest):
    ckpt, lines = Checkpointer(tmp_path), []
    ckpt.save(1, *_trained(), {})
    path = ckpt.save(2, *_trained(), {})
    (path / ck.MANIFEST).write_text(json.dumps(manifest))
    assert "does not list the files" in verify(path)
    assert ckpt.load_latest(*_fresh(), log=lines.append)["step"] == 1
    assert lines == [f"checkpoint step_00000002 is damaged or incomplete ({verify(path)}); trying an older one"]
    assert ckpt.latest().name == "step_00000001"


def test_another_models_checkpoint_is_skipped(tmp_path):
    ours, lines = Checkpointer(tmp_path, fingerprint="ours"), []
    model, optimizer = _trained()
    ours.save(1, model, optimizer, {})
    good = _state(model, optimizer)
    Checkpointer(tmp_path, fingerprint="theirs").save(2, *_trained(steps=2), {})
    assert json.loads((tmp_path / "step_00000001" / ck.MANIFEST).read_text())["fingerprint"] == "ours"
    model, optimizer = _fresh()
    assert ours.load_latest(model, optimizer, log=lines.append)["path"] == tmp_path / "step_00000001"
    assert _same(_state(model, optimizer), good)
    assert lines == ["checkpoint step_00000002 belongs to another model (fingerprint theirs, this one is ours); "
                     "skipping it"]


def test_checkpoints_that_do_not_fit_are_skipped_before_loading(tmp_path):
    # without recorded fingerprints (older checkpoints): wider layers, then a missing layer
    ckpt, lines = Checkpointer(tmp_path), []
    model, optimizer = _trained()
    ckpt.save(1, model, optimizer, {})
    good = _state(model, optimizer)
    ckpt.save(2, *_trained(width=16), {})
    ckpt.save(3, *_trained(layers=1, steps=3), {})
    model, optimizer = _fresh()
    assert ckpt.load_latest(model, optimizer, log=lines.append)["step"] == 1
    assert _same(_state(model, optimizer), good)
    assert lines == ["checkpoint step_00000003 does not fit this model (it has no model.1.weight); trying an older one",
                     "checkpoint step_00000002 does not fit this model (model.0.weight is [16, 16] in it, [8, 8] "
                     "here); trying an older one"]
    model, optimizer = _fresh(width=4)  # fits none: left as it was
    before = _state(model, optimizer)
    assert ckpt.load_latest(model, optimizer, log=lambda m: None) is None
    assert _same(_state(model, optimizer), before) and not optimizer.state


def test_load_latest_at_most(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=5)
    for step in (1, 2, 3):
        ckpt.save(step, *_trained(steps=step), {"note": step})
    state = ckpt.load_latest(*_fresh(), at_most=2)
    assert state["step"] == state["note"] == 2 and state["path"] == tmp_path / "step_00000002"
    assert ckpt.load_latest(*_fresh(), at_most=0) is None


def test_pruning_keeps_this_models_newest_intact_checkpoints(tmp_path):
    ours, theirs = Checkpointer(tmp_path, keep=2, fingerprint="A"), Checkpointer(tmp_path, keep=2, fingerprint="B")
    model, optimizer = _trained()
    ours.save(1, model, optimizer, {})
    theirs.save(2, model, optimizer, {})
    ours.save(3, model, optimizer, {})
    ours.save(4, model, optimizer, {})
    (tmp_path / "step_00000004" / ck.MANIFEST).unlink()  # damaged
    ours.save(5, model, optimizer, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003", "step_00000004",
                                                          "step_00000005"]
    assert ours.intact_steps() == [3, 5] and ours.latest() == tmp_path / "step_00000005"
    assert theirs.intact_steps() == [2] and Checkpointer(tmp_path).intact_steps() == [2, 3, 5]


@pytest.mark.parametrize("keep", [0, -1])
def test_keeping_no_checkpoint_is_refused(tmp_path, keep):
    with pytest.raises(ValueError, match=f"keep={keep} must be at least 1"):
        Checkpointer(tmp_path, keep=keep)


def _full(root, step, newest):
    return (f"no space left on device writing checkpoint step_{step:08d} in {root}; removed the partial "
            f"checkpoint. The newest intact checkpoint is {newest}")


@pytest.mark.parametrize("error,free,full", [
    (OSError(errno.ENOSPC, "No space left on device"), None, True),
    # what torch's zip writer raises on a full disk: no errno, so the free space tells
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), 0, True),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), None, False),
])
def test_a_failed_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch, error, free, full):
    def write_data(self, plan, planner):  # DCP's writer, half way through
        (tmp_path / ".tmp_step_00000002" / "__0_0.distcp").write_bytes(b"partial")
        raise error
    ckpt = Checkpointer(tmp_path)
    model, optimizer = _trained()
    ckpt.save(1, model, optimizer, {})
    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", write_data)
    if free is not None:
        monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, free))
    with pytest.raises(MoecError if full else dcp.api.CheckpointException) as e:
        ckpt.save(2, model, optimizer, {})
    assert not full or str(e.value) == _full(tmp_path, 2, "step_00000001")
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]


def _rank(rank, root, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    real = torch.save

    def save(obj, f, *a, **k):  # rank 1's own small file finds the disk full
        if rank == 1 and str(f).endswith("extra_rank1.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)
    torch.save = save
    try:
        Checkpointer(root, rank=rank).save(1, *_trained(), {})
    except MoecError as e:
        (out / f"rank{rank}").write_text(str(e))
    torch.distributed.destroy_process_group()


def test_one_ranks_full_disk_stops_every_rank(tmp_path):
    # the other rank would wait forever at a barrier
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, (tmp_path / "ckpts", port, tmp_path), nprocs=2)
    message = (f"no space left on device writing checkpoint step_00000001 in {tmp_path / 'ckpts'}; removed the "
               f"partial checkpoint. There is no intact checkpoint yet")
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == [message, message]
    assert list((tmp_path / "ckpts").iterdir()) == []
