"""`moec compile`: model.py -> build dir (model.py, model.safetensors, config.json, ir/, kernels/).

The graph is captured and transformed on the meta device first (no weights:
a 70B model compiles in seconds). When the MoE model's weights fit the
--max-weights-gb budget they are made for real: the dense model is built on
the CPU (or loaded from --weights), captured and upcycled again. Everything is
written to a temporary directory that replaces the build dir only at the end.
"""
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import moec
from moec.base.errors import MoecError
from moec.driver.capture import LogitsOnly, build, capture, example_inputs, load_module, logits_of
from moec.codegen import source
from moec.codegen.program import model_source, write_weights
from moec.codegen.train_program import write_train_program
from moec.passes.ffn_to_moe import MoeOptions
from moec.passes.insert_collectives import EPOptions
from moec.driver.pipeline import build_pipeline, run_pipeline
from moec.runtime import load_state

VERIFY_TOLERANCE = 1e-4  # fp32: the construction is exact up to summation order


@dataclass
class CompileRequest:
    model: str
    out: str
    options: MoeOptions = field(default_factory=MoeOptions)
    entry: str = "build_model"
    config: str | None = None
    overrides: dict = field(default_factory=dict)
    weights: str | None = None
    verify: bool = True
    force: bool = False
    batch: int = 2
    seq: int = 16
    seed: int = 0
    max_weights_gb: float = 4.0
    dense: bool = False
    gpus: int = 0  # > 0: let the planner choose the parallel plan for this many GPUs
    hardware: str = "dgx_h100"
    triton: bool = True  # lower routing to generated Triton kernels (they fall back to torch on CPU)
    ep: EPOptions | None = None  # expert parallelism (insert_collectives); a --gpus plan sets its EP


def compile_model(req: CompileRequest, log=print) -> dict:
    out = Path(req.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not req.force:
        raise MoecError(f"{out} exists and is not empty; pass --force to replace it")
    mod = load_module(req.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        report = _compile_into(req, mod, tmp, log)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}/")
    return report


def _compile_into(req: CompileRequest, mod, tmp: Path, log) -> dict:
    t0 = time.perf_counter()
    meta_model = build(mod, req.entry, req.config, req.overrides, "meta")
    inputs = example_inputs(mod, meta_model, req.batch, req.seq, "meta")
    gm = capture(meta_model, inputs)
    log(f"capture: {len(gm.graph.nodes)} nodes via {gm.meta['frontend']} ({time.perf_counter() - t0:.1f} s)")
    plan = _plan(req, gm, meta_model, tmp, log) if req.gpus and not req.dense else None
    if plan is not None:
        req = replace(req, ep=replace(req.ep or EPOptions(), ep=plan.ep))
    gm, rows = run_pipeline(gm, build_pipeline(req.options, req.dense, plan, req.triton, req.ep), tmp / "ir", log)
    nbytes = sum(p.numel() * p.element_size() for p in gm.parameters())
    real = nbytes <= req.max_weights_gb * 2**30
    report = {"params": rows[-1]["params"], "active_params": rows[-1]["active_params"],
              "moe_layers": rows[-1]["moe_layers"], "weights_written": real}
    if req.weights and not real:
        raise MoecError(f"the MoE model's weights would take {nbytes / 2**30:.1f} GiB, over --max-weights-gb "
                        f"{req.max_weights_gb}; raise it to upcycle --weights")
    if real:
        torch.manual_seed(req.seed)
        dense = build(mod, req.entry, req.config, req.overrides, "cpu")
        if req.weights:
            load_dense(dense, req.weights)
        real_inputs = example_inputs(mod, dense, req.batch, req.seq)
        gm, _ = run_pipeline(capture(dense, real_inputs),
                             build_pipeline(req.options, req.dense, plan, req.triton, req.ep))
        write_weights(gm, tmp / "model.safetensors")
        log(f"weights: {nbytes / 2**20:.1f} MiB -> model.safetensors")
    else:
        log(f"weights: {nbytes / 2**30:.1f} GiB is over --max-weights-gb {req.max_weights_gb}; none written")
    if req.verify and not req.dense:
        report["verify_max_rel_error"] = _verify(req, mod, dense if real else None, log)
    (tmp / "model.py").write_text(model_source(gm, _title(req), _kernel_modules(gm, tmp), _user_code(gm, mod, tmp)))
    (tmp / "config.json").write_text(json.dumps(_config(req, report), indent=1, sort_keys=True) + "\n")
    write_train_program(tmp, _config(req, report))
    return report


def _plan(req: CompileRequest, gm, model, tmp: Path, log):
    """The planner's best plan for --gpus on --hardware; plan.json records it and the runners-up."""
    from moec.cost_model import MoeOptions as PlanMoe, rank_plans
    from moec.cost_model.report import write_plan_json
    from moec.driver.model_shape import shape_from_graph

    o = req.options
    shape = shape_from_graph(gm, model, f"{Path(req.model).name}:{req.config or 'default'}", None)
    moe = PlanMoe(experts=o.experts, topk=o.topk, granularity=o.granularity, shared_experts=o.shared_experts,
                  first_dense=o.first_dense, moe_every=o.moe_every)
    ranked, enumerated = rank_plans(shape, moe, req.gpus, req.hardware)
    write_plan_json(tmp, ranked, enumerated, shape, moe)
    log(f"plan: {ranked[0].why}")
    return ranked[0]


def _user_code(gm, mod, tmp: Path) -> tuple[str, str] | None:
    """A graph with opaque calls into the model file needs that file beside it: copy it into source/."""
    if not gm.meta.get("opaque"):
        return None
    src = Path(mod.__file__)
    (tmp / "source").mkdir()
    shutil.copyfile(src, tmp / "source" / src.name)
    return mod.__name__, f"source/{src.name}"


def _kernel_modules(gm, tmp: Path) -> list[str]:
    kernels = gm.meta.get("kernels", {})
    source.write(tmp, kernels)
    return sorted(kernels)


def _title(req: CompileRequest) -> str:
    o = req.options
    if req.dense:
        return f"{Path(req.model).name} ({req.config or 'default config'}), dense"
    return (f"{Path(req.model).name} ({req.config or 'default config'}) upcycled to {o.experts} experts, "
            f"top-{o.topk}")


def _config(req: CompileRequest, report: dict) -> dict:
    return {"moec_version": moec.__version__, "model": Path(req.model).name, "entry": req.entry,
            "config": req.config, "overrides": req.overrides, "weights": req.weights and Path(req.weights).name,
            "seed": req.seed, "moe": None if req.dense else req.options.to_json(), "result": report,
            "ep": req.ep and req.ep.to_json()}


def _verify(req: CompileRequest, mod, dense, log) -> float | None:
    """Max relative error between the dense model and its upcycled copy (no noise, no capacity)."""
    shrunk = dense is None
    if shrunk:
        shrink = getattr(mod, "VERIFY_OVERRIDES", None)
        if shrink is None:
            log("verify: skipped (weights too large and the model file defines no VERIFY_OVERRIDES)")
            return None
        torch.manual_seed(req.seed)
        dense = build(mod, req.entry, req.config, {**req.overrides, **shrink}, "cpu")
    inputs = example_inputs(mod, dense, req.batch, req.seq)
    opts = replace(req.options, upcycle_noise=0.0, capacity_factor=0.0)
    if opts.pyramid:
        opts = replace(opts, pyramid=(opts.pyramid[0], min(opts.pyramid[1], 1)))
    dense.eval()  # dropout off: compare the deterministic function
    with torch.no_grad():
        ref = logits_of(dense(*inputs))
        gm, _ = run_pipeline(capture(dense, inputs), build_pipeline(opts))
        got = gm(*inputs)["logits"]
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    log(f"verify: upcycled vs dense logits, max relative error {err:.2e}{' (on a shrunk config)' if shrunk else ''}")
    if not err <= VERIFY_TOLERANCE:
        raise MoecError(f"verify: the upcycled model differs from the dense one by {err:.2e} (relative), over "
                        f"{VERIFY_TOLERANCE:.0e}; rerun with --debug and report it, or pass --no-verify")
    return err


def load_dense(model: torch.nn.Module, path: str) -> None:
    """Load dense weights (safetensors, or a torch state dict loaded with weights_only)."""
    p = Path(path)
    if not p.is_file():
        raise MoecError(f"--weights {path}: no such file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MoecError(f"--weights {path}: cannot read it ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    target = model.model if isinstance(model, LogitsOnly) else model
    try:
        load_state(target, state)
    except RuntimeError as e:
        raise MoecError(f"--weights {path}: {e}") from e
