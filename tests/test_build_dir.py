"""The build dir as a place: recompiling keeps its runs/, any name fits, modes follow the umask, and where no
build dir can be made the user gets one line."""
import errno
import os
import stat
from pathlib import Path

from click.testing import CliRunner

from moec.driver import compiler
from moec.driver.cli import main

GPT = Path(__file__).resolve().parent.parent / "examples" / "gpt.py"
TINY = ["--experts", "4", "--no-verify", *[a for kv in ("n_layer=2", "n_head=2", "n_embd=32", "vocab_size=64",
                                                     "block_size=32") for a in ("--set", kv)]]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def compile_tiny(out, *args):
    r = run("compile", GPT, "-o", out, *TINY, *args)
    assert r.exit_code == 0, r.output
    return r


def files(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def train_into(build: Path) -> dict:
    """What a train.py run leaves in its default run dir (the bytes do not matter)."""
    latest = build / "runs" / "latest"
    (latest / "checkpoints" / "step_000100").mkdir(parents=True)
    (latest / "checkpoints" / "step_000100" / "model.safetensors").write_bytes(b"checkpoint")
    (latest / "final.safetensors").write_bytes(b"final")
    return files(build / "runs")


def last_line(r) -> str:
    return r.output.strip().splitlines()[-1]


def test_recompiling_keeps_the_runs(tmp_path):
    out = tmp_path / "b"
    compile_tiny(out)
    runs = train_into(out)
    refused = run("compile", GPT, "-o", out, *TINY)
    assert refused.exit_code == 2 and "--force" in last_line(refused) and "runs/" in last_line(refused)
    compile_tiny(out, "--force", "--topk", "1")
    assert files(out / "runs") == runs
    assert '"topk": 1' in (out / "config.json").read_text()
    assert os.listdir(tmp_path) == ["b"]  # no temporary dir left beside it


def test_a_failed_recompile_leaves_the_old_build_and_its_runs(tmp_path, monkeypatch):
    out = tmp_path / "b"
    compile_tiny(out)
    train_into(out)
    before = files(out)
    failed = run("compile", GPT, "-o", out, *TINY, "--force", "--set", "no_such_field=1")
    assert failed.exit_code == 2 and files(out) == before
    real = Path.rename

    def rename(self, target):  # the last step, the new build onto out, fails
        if Path(target) == out and self.parent == out.parent:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    failed = run("compile", GPT, "-o", out, *TINY, "--force")
    assert failed.exit_code == 2 and last_line(failed).startswith(f"error: cannot replace {out}: input/output error")
    assert files(out) == before and os.listdir(tmp_path) == ["b"]


def test_a_build_dir_name_as_long_as_names_go(tmp_path):
    out = tmp_path / ("b" * 250)  # Linux allows 255 bytes
    for force in ([], ["--force"]):
        compile_tiny(out, "--stop-after", "find_ffn", *force)
    assert (out / "config.json").is_file() and os.listdir(tmp_path) == [out.name]


def test_the_build_follows_the_umask(tmp_path):
    out = tmp_path / "b"
    umask = os.umask(0o027)
    try:
        compile_tiny(out)
    finally:
        os.umask(umask)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert "b/weights.safetensors" in modes and "b/ir" in modes
    assert modes == {name: 0o750 if (tmp_path / name).is_dir() else 0o640 for name in modes}


def test_where_no_build_dir_can_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file" / "b", tmp_path / "file" / "deeper" / "b"):
        r = run("compile", GPT, "-o", out, *TINY)
        assert r.exit_code == 2
        assert r.output.strip() == f"error: cannot create {out}: {tmp_path / 'file'} is not a directory"
    compile_tiny(tmp_path / "new" / "deeper" / "b", "--stop-after", "find_ffn")  # missing parents are made


def test_a_parent_dir_that_is_not_writable_is_one_line(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()

    def refused(prefix, dir):  # what a 0555 parent gives a user without root's override
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix + "x"))

    monkeypatch.setattr(compiler.tempfile, "mkdtemp", refused)
    r = run("compile", GPT, "-o", ro / "b", *TINY)
    assert r.exit_code == 2 and r.output.strip() == f"error: cannot create {ro / 'b'}: permission denied in {ro}"
