"""A --pp build's stages: where the layers are cut (moec.cost_model.pipeline.cut: by predicted time, and for a
planned build within each stage's GPU memory; the cut `moec plan --explain` shows), stages.py, and the check
that the stages run one after another compute model.py's logits."""
import sys
from pathlib import Path

import torch

from moec.base.errors import MoecError
from moec.base.options import Options
from moec.codegen.program import top_graph
from moec.codegen.stages import stages_source
from moec.base.options import stages_per_rank
from moec.cost_model.pipeline import cut
from moec.cost_model.shape import ModelShape
from moec.runtime.kernels.generated import import_file
from moec.runtime.training import pipeline
from moec.runtime.weights import load_build

STAGE_TOLERANCE = 1e-6  # the stages run model.py's operations in its order: equal up to rounding at most


def write_stages(gm: torch.fx.GraphModule, o: Options, shape: ModelShape, directory: Path, title: str, log,
                 values: dict | None = None, capacity: float = 0.0) -> list[int]:
    """stages.py for the graph; the layer each stage starts at, then the layer count. values, capacity: a
    planned build's plan and GPU memory, which every stage must fit."""
    loop = top_graph(gm).runs
    if len(loop) != 1 or len(loop[0].blocks) != shape.layers:
        raise MoecError(f"--pp cuts the model's loop of layers into stages, and model.py has "
                        f"{len(loop)} loops for the model's {shape.layers} FFN layers; pipeline parallelism needs one "
                        f"loop of them")
    bounds, shares, held = cut(shape, o, o.pp * stages_per_rank(o.pp_schedule), values, capacity)
    (directory / "stages.py").write_text(stages_source(gm, bounds, title))
    log(f"pipeline: {len(shares)} stages over {o.pp} ranks ({o.pp_schedule}), layers "
        f"{' | '.join(f'{a}-{b - 1}' for a, b in zip(bounds, bounds[1:]))}, "
        f"FLOPs shares {' '.join(f'{x:.0%}' for x in shares)}"
        + (f", predicted peak GiB {' '.join(f'{m / 2**30:.1f}' for m in held)}" if held else "") + " -> stages.py")
    return bounds


def check_stages(directory: Path, gm: torch.fx.GraphModule, inputs: tuple) -> float:
    """The largest relative difference between model.py's logits and its stages' run one after another."""
    saved = sys.modules.get("model")
    try:
        program = import_file("model", directory / "model.py")
        stages = import_file(f"moec_stages_{id(gm)}", directory / "stages.py")
    finally:
        if saved is None:
            sys.modules.pop("model", None)
        else:
            sys.modules["model"] = saved
    model = load_build(program.Model, directory)
    model.eval()
    with torch.no_grad():
        ref = model(*inputs)["logits"]
        x = inputs[0]
        for cls in stages.STAGES:
            x = pipeline.restrict(model, cls.READS, cls.LAYERS, cls)(x)
    pipeline.clear_records()
    return ((x - ref).abs().max() / ref.abs().max()).item()

