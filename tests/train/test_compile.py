"""--compile: the moec:: custom ops trace into one graph (no graph breaks), and train.py runs under it and
reports the graph breaks in its first record."""
import importlib.util

import torch
import torch._dynamo

from moec.runtime.training.progress import read_metrics
from tests.train.conftest import run_train


def _model_class(build):
    spec = importlib.util.spec_from_file_location("tiny_moe_model", build / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Model


def test_no_graph_breaks(moe_build):
    import moec.runtime as rt
    model = rt.load_build(_model_class(moe_build), moe_build)
    tokens = torch.randint(0, 256, (2, 16))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(tokens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # forward and backward through the compiled graph agree with eager
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = compiled(tokens)
    want = model(tokens)
    torch.testing.assert_close(got["logits"], want["logits"])
    got["logits"].sum().backward()


def test_train_py_compile(moe_build, tmp_path):
    r = run_train(moe_build, "--steps", 3, "--compile", "--log-every", 1, "--ckpt-every", 0, "--eval-every", 0,
                  run_dir=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "step 3:" in r.stderr and "graph breaks 0" in r.stderr
    records = [x for x in read_metrics(tmp_path / "metrics.jsonl") if x["kind"] == "train"]
    assert records[0]["graph_breaks"] == 0 and all("graph_breaks" not in x for x in records[1:])
