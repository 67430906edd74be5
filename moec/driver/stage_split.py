"""A --pp build's stages: where the layers are cut, stages.py, and the check that the stages run one after
another compute model.py's logits.

Each layer weighs its FLOPs per token, twice its active parameters (an
expert's weights count K/E of their size); the last stage also carries the
head (vocabulary x hidden); the embedding lookup costs no GEMM. The cut
that makes the heaviest stage lightest is moec.cost_model.pipeline.split's.
"""
import importlib.util
import sys
from pathlib import Path

import torch

from moec.base.errors import MoecError
from moec.base.options import Options
from moec.codegen.program import top_graph, weights
from moec.codegen.stages import stages_source
from moec.cost_model.pipeline import split, stages_per_rank
from moec.runtime import load_state
from moec.runtime.distributed.params import is_expert
from moec.runtime.training import pipeline

STAGE_TOLERANCE = 1e-6  # the stages run model.py's operations in its order: equal up to rounding at most


def layer_costs(gm: torch.fx.GraphModule, o: Options) -> tuple[list[float], float]:
    """(FLOPs per token of each layer of the model's loop, of the head)."""
    top = top_graph(gm)
    if len(top.runs) != 1:
        raise MoecError(f"--pp cuts the model's layers into stages, and this model has {len(top.runs)} loops of "
                        f"layers (model.py); pipeline parallelism needs exactly one")
    params = dict(gm.named_parameters())
    costs = []
    for block in top.runs[0].blocks:
        mine = {n: p for n, p in params.items() if n.startswith(block.path + ".")}
        costs.append(2.0 * sum(p.numel() * (min(o.routed_topk, p.shape[0]) / p.shape[0] if is_expert(n) else 1)
                               for n, p in mine.items()))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    logits = out["logits"].meta["val"] if isinstance(out, dict) else None
    carry = top.runs[0].blocks[-1].outputs[0].meta.get("val")
    head = 2.0 * logits.shape[-1] * carry.shape[-1] if logits is not None and carry is not None else 0.0
    return costs, float(head)


def stage_bounds(gm: torch.fx.GraphModule, o: Options) -> list[int]:
    costs, head = layer_costs(gm, o)
    return split(costs, o.pp * stages_per_rank(o.pp_schedule), last=head)


def write_stages(gm: torch.fx.GraphModule, o: Options, directory: Path, title: str, log) -> list[int]:
    bounds = stage_bounds(gm, o)
    (directory / "stages.py").write_text(stages_source(gm, bounds, title))
    costs, head = layer_costs(gm, o)
    shares = [sum(costs[a:b]) + (head if b == len(costs) else 0) for a, b in zip(bounds, bounds[1:])]
    log(f"pipeline: {len(shares)} stages over {o.pp} ranks ({o.pp_schedule}), layers "
        f"{' | '.join(f'{a}-{b - 1}' for a, b in zip(bounds, bounds[1:]))}, "
        f"FLOPs shares {' '.join(f'{s / sum(shares):.0%}' for s in shares)} -> stages.py")
    return bounds


def check_stages(directory: Path, gm: torch.fx.GraphModule, inputs: tuple) -> float:
    """The largest relative difference between model.py's logits and its stages' run one after another."""
    saved = sys.modules.get("model")
    try:
        program = _load("model", directory / "model.py")
        stages = _load(f"moec_stages_{id(gm)}", directory / "stages.py")
    finally:
        if saved is None:
            sys.modules.pop("model", None)
        else:
            sys.modules["model"] = saved
    model = program.Model()
    load_state(model, weights(gm))
    model.eval()
    with torch.no_grad():
        ref = model(*inputs)["logits"]
        x = inputs[0]
        for cls in stages.STAGES:
            x = pipeline.restrict(model, cls.READS, cls.LAYERS, cls)(x)
    pipeline.clear_records()
    return ((x - ref).abs().max() / ref.abs().max()).item()


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
