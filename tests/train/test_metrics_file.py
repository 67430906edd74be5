"""metrics.jsonl survives the ways a run dies: a kill while resume rewrites it, and a kill mid-append
(a cut last line) that later resumes and `moec plot` read."""
import io
import json

import pytest
from click.testing import CliRunner

from moec.base.errors import MoecError
from moec.driver.cli import main
from moec.runtime.training.progress import MetricsFile, Progress, read_metrics


def _record(step: int, kind: str = "train") -> dict:
    if kind == "val":
        return {"kind": "val", "step": step, "val_loss": 4.0 - step / 10}
    return {"kind": "train", "step": step, "lm_loss": 5.0 - step / 10,
            "expert_load": [{"max": 9.0, "mean": 8.0, "dropped": 0.0}]}


def _write(path, records, tail: str = "") -> str:
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    path.write_text(text)
    return text


def test_a_crash_while_resume_rewrites_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    before = _write(path, [_record(s) for s in range(1, 6)])
    real_open = io.open

    def open_then_die(file, mode="r", *args, **kwargs):  # the file is opened (truncated), then the disk is full
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            f.close()
            raise OSError(28, "No space left on device")
        return f

    monkeypatch.setattr(io, "open", open_then_die)
    with pytest.raises(OSError, match="No space"):
        MetricsFile(path, resume_step=3)
    monkeypatch.undo()
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left behind


def test_resume_drops_records_past_the_step_and_keeps_the_mode(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [_record(1), _record(2), _record(2, "val"), _record(3), _record(4)])
    path.chmod(0o644)
    f = MetricsFile(path, resume_step=2)
    f.write(_record(3))
    assert [(r["kind"], r["step"]) for r in read_metrics(path)] == [("train", 1), ("train", 2), ("val", 2),
                                                                  ("train", 3)]
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_cut_last_line_is_dropped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    _write(path, [_record(1), _record(2)], tail='{"kind": "train", "step": 3, "lm_lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    err = capsys.readouterr().err
    assert f"{path}:3" in err and "warning" in err


def test_resume_over_a_cut_last_line_rewrites_without_it(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    _write(path, [_record(1), _record(2)], tail='{"kind": "train", "st')
    f = MetricsFile(path, resume_step=10)
    f.write(_record(3))  # appended on a line of its own, not glued to the cut one
    assert path.read_text().splitlines() == [json.dumps(_record(s)) for s in (1, 2, 3)]
    capsys.readouterr()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert capsys.readouterr().err == ""  # the cut line is gone for good: no warning on the next read


def test_a_bad_line_in_the_middle_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [_record(1)], tail='{"kind": "tr\n' + json.dumps(_record(2)) + "\n")
    with pytest.raises(MoecError, match=f"{path}:2"):
        read_metrics(path)
    with pytest.raises(MoecError, match=f"{path}:2"):
        MetricsFile(path, resume_step=5)


def test_plot_of_a_run_killed_mid_append(tmp_path):
    _write(tmp_path / "metrics.jsonl", [_record(1), _record(2), _record(2, "val")], tail='{"kind": "tra')
    out = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "metrics.jsonl:4" in out.output  # the warning (stderr; click's output holds both streams)
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_of_a_damaged_file_is_one_line_exit_2(tmp_path):
    _write(tmp_path / "metrics.jsonl", [_record(1)], tail="garbage\n" + json.dumps(_record(2)) + "\n")
    out = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert out.exit_code == 2 and "metrics.jsonl:2" in out.output


def test_the_bar_leaves_out_of_its_rate_the_steps_the_metrics_line_leaves_out():
    # the warm-up step, and on a GPU the step run under the profiler, are slower than the run: the bar's
    # tokens/s must be the metrics line's, which counts neither
    stream = io.StringIO()
    bar = Progress(total=4, start=0, every=4, stream=stream)
    for step, rate in enumerate((1.0, 200.0, 1.0, 100.0)):
        bar.update(step, 0.5, None if rate == 1.0 else rate)
    shown = stream.getvalue().split(" tok/s")[0].rsplit(" ", 1)[1]
    assert shown == f"{2 / (1 / 200 + 1 / 100):,.0f}"
