"""`moec compile`: model.py -> build dir (model.py, weights.safetensors, upcycle.json, config.json, ir/, kernels/).

The graph is captured and transformed on the meta device first (no weights:
a 70B model compiles in seconds). The passes make no expert: the build stores the dense weights once (in
the dtype they came in) with the routers and each expert tensor's recipe, and train.py makes on each rank
the experts it holds. Dense weights from --weights or a Hugging Face checkpoint directory are streamed: the
graph stays on the meta device, the passes read a weight from its shard when they need its value
(calibration, the recipe's statistics), and each tensor goes from its shard into the build alone, so no
copy of the model is held (moec.driver.dense_weights); with --reference-weights the build names the
checkpoint's files instead of copying them. Without such weights the dense model the model file
initialises is built on the CPU (when it fits --max-weights-gb), captured and run through the passes
again. Everything is written to a temporary directory that replaces the build dir only at the end, keeping
its runs/.
What can be checked without the model is checked before the capture; what needs its shapes, right after.
"""
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import moec
from moec.base.errors import MoecError
from moec.base.files import umask
from moec.base.options import Options
from moec.codegen import source
from moec.codegen.program import model_source, stored_bytes, weights, write_weights
from moec.codegen.train_program import write_train_program
from moec.driver.capture import LogitsOnly, build, capture, example_inputs, load_module, logits_of
from moec.driver.dense_weights import DenseWeights, Streamed, open_weights
from moec.driver.hf_dir import is_hf_dir
from moec.driver.inputs import check_build_dir, check_expert_parallel, check_file, is_build
from moec.driver.model_shape import context_length
from moec.driver.pipeline import check_stop_after, passes_for, run_pipeline
from moec.driver.stage_split import STAGE_TOLERANCE, check_stages, write_stages
from moec.passes.find_ffn import FindFFN
from moec.runtime.kernels.generated import import_file
from moec.runtime.weights import RECIPE, REFERENCES, WEIGHTS, load_build, sha256

VERIFY_TOLERANCE = 1e-4  # fp32: the construction is exact up to summation order
BATCH, SEQ = 2, 16  # the example inputs capture and verification run on


def compile_model(model: str, out: str, options: Options, force: bool = False, stop_after: str | None = None,
                  log=print) -> dict:
    """Compile the model file into the build dir `out`; stop_after: write only ir/ and config.json, up to
    that pass. With force, an existing `out` is replaced, all but its runs/ (train.py's), which the new build
    keeps."""
    out = Path(out)
    check_build_dir(out, force)
    check_expert_parallel(options)
    check_file("--calibration-data", options.calibration_data)
    check_stop_after(stop_after)
    if is_build(Path(model)):
        raise MoecError(f"{model} is a build moec wrote; give the model file or Hugging Face directory it was "
                        f"compiled from (its trained weights: --weights RUN_DIR/final.safetensors)")
    dense = open_weights(options.weights) if options.weights else \
        open_weights(model, label=model) if is_hf_dir(model) else None
    if options.reference_weights and (dense is None or dense.state is not None):
        raise MoecError("--reference-weights: the build names the dense checkpoint's safetensors files; give them "
                        "(--weights, or a Hugging Face directory as the model)" if dense is None else
                        f"--reference-weights: {dense.label} is a torch state dict; it references safetensors "
                        f"files only")
    hardware = _hardware(options)
    mod = load_module(model)
    # the outermost directory this compile makes on the way to out: a failed compile leaves none behind
    made = next((p for p in reversed(out.parents) if not os.path.lexists(p)), None)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # a short name: out.name may already be as long as a name can be
        tmp = Path(tempfile.mkdtemp(prefix=".moec-", dir=out.parent))
    except (FileExistsError, NotADirectoryError) as e:  # the nearest existing parent is not a dir
        blocker = next(p for p in out.parents if os.path.lexists(p))
        raise MoecError(f"cannot create {out}: {blocker} is not a directory") from e
    except OSError as e:  # e.filename: the dir it failed to make
        raise MoecError(f"cannot create {out}: {e.strerror.lower()} in {Path(e.filename or out).parent}") from e
    try:
        report = _compile_into(model, options, mod, tmp, stop_after, log, dense, hardware)
        _follow_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(out.parent, made)
        raise
    _replace(out, tmp)
    log(f"wrote {out}/")
    return report


def _remove_made(directory: Path, made: Path | None) -> None:
    """Remove directory and its parents up to made (the ones a compile made), while they are empty."""
    if made is None:
        return
    for d in (directory, *directory.parents):
        try:
            d.rmdir()
        except OSError:
            return
        if d == made:
            return


def _replace(out: Path, tmp: Path) -> None:
    """Put the build tmp at out, carrying out/runs over into it. Only renames, undone if one fails: either
    the new build is at out or the old one is, with its runs/."""
    runs, trash, carried = out / "runs", None, False
    try:
        if os.path.lexists(runs):
            runs.rename(tmp / "runs")
            carried = True
        if os.path.lexists(out):
            trash = Path(tempfile.mkdtemp(prefix=".moec-", dir=out.parent))
            out.rename(trash / "old")
        tmp.rename(out)
    except BaseException as e:
        if trash is not None and os.path.lexists(trash / "old"):
            (trash / "old").rename(out)
        if carried:
            (tmp / "runs").rename(runs)  # before tmp is deleted: if this fails, nothing is
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        if isinstance(e, OSError):
            raise MoecError(f"cannot replace {out}: {e.strerror.lower()}; it is left as it was") from e
        raise
    if trash is not None:
        shutil.rmtree(trash)


def _follow_umask(build: Path) -> None:
    """Give build and everything in it the modes mkdir and open would have: mkdtemp makes the dir 0700 and
    safetensors writes the weights 0600."""
    mask = umask()
    build.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(build):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _compile_into(model: str, o: Options, mod, tmp: Path, stop_after, log, dense_weights: DenseWeights | None,
                  hardware) -> dict:
    t0 = time.perf_counter()
    meta_model = build(mod, o.entry, o.config, o.overrides, "meta")
    dtypes = {}  # what the build stores each dense tensor as: the dtype the checkpoint held it in
    streamed = None
    if dense_weights is not None:
        dense_weights.check(_unwrapped(meta_model))  # names and shapes only: the model is on meta
        if dense_weights.nbytes() > o.max_weights_gb * 2**30 and stop_after is None and not o.reference_weights:
            raise MoecError(f"the dense weights take {dense_weights.nbytes() / 2**30:,.1f} GiB, over "
                            f"--max-weights-gb {o.max_weights_gb}; raise it to upcycle {dense_weights.label}")
        wrapped = "model." if isinstance(meta_model, LogitsOnly) else ""  # the graph's names of the tensors
        dtypes = dense_weights.dtypes_in(_unwrapped(meta_model), wrapped)
        if stop_after is None:  # which writes no weights: the passes see none either
            shell = build(mod, o.entry, o.config, o.overrides, "shell")
            streamed = Streamed(dense_weights, _unwrapped(meta_model), shell, wrapped)
    dense = None
    if dense_weights is None and stop_after is None and _bytes(meta_model) <= o.max_weights_gb * 2**30:
        # the build will hold real weights: capture the dense model itself, once, instead of on meta and again
        torch.manual_seed(o.seed)
        dense = build(mod, o.entry, o.config, o.overrides, "cpu")
        gm = capture(dense, example_inputs(mod, dense, BATCH, SEQ))
    else:
        gm = capture(meta_model, example_inputs(mod, meta_model, BATCH, SEQ, "meta"))
    if streamed is not None:  # the passes read the weights from the checkpoint as they need them
        gm.meta["dense_values"] = streamed.value
    log(f"capture: {len(gm.graph.nodes)} nodes via {gm.meta['frontend']} ({time.perf_counter() - t0:.1f} s)")
    _check_against_model(gm, o)
    context = context_length(gm, meta_model)
    plan = _plan(model, o, gm, meta_model, tmp, log, hardware) if o.gpus else None
    if plan is not None:
        o = o.with_plan(plan).validate()
    shape = _shape(model, o, gm, meta_model) if o.pp > 1 else None  # the stages are cut by its layers' FLOPs
    gm, rows = run_pipeline(gm, passes_for(o, plan, stop_after), tmp / "ir", log)
    report = {"params": rows[-1]["params"], "active_params": rows[-1]["active_params"],
              "moe_layers": rows[-1]["moe_layers"], "context": context,
              "router_biases": gm.meta.get("router_biases", []),
              "tp_plan": gm.meta.get("tp_plan", {})}  # weight -> how the runtime splits it over the TP ranks
    hf_config = _hf_config(meta_model)
    if stop_after is not None:
        _write_config(tmp, model, o, {**report, "stopped_after": stop_after, "weights_written": False}, hf_config)
        return report
    nbytes = _bytes(gm)  # the whole MoE model's
    stored = stored_bytes(gm, dtypes)  # what the build holds: the dense weights, routers, no experts
    # a build that references the checkpoint writes the routers alone, whatever the dense weights' size
    real = stored <= o.max_weights_gb * 2**30 or streamed is not None and o.reference_weights
    moe_fits = nbytes <= o.max_weights_gb * 2**30  # then compile-time checks make the whole MoE model
    report["weights_written"], report["weights_bytes"], report["moe_weights_bytes"] = real, stored, nbytes
    if dense_weights is not None and not real:
        raise MoecError(f"the dense weights would take {stored / 2**30:,.1f} GiB, over --max-weights-gb "
                        f"{o.max_weights_gb}; raise it to upcycle {dense_weights.label}")
    if real and streamed is not None:
        # the graph stays on meta: each tensor goes from the checkpoint (or the passes) into the build alone
        initial = gm.meta.get("initial_values", {})
        referenced = _reference(streamed, [n for n in weights(gm) if n in dtypes], tmp, log) \
            if o.reference_weights else {}
        write_weights(gm, tmp, dtypes, lambda name: initial[name] if name in initial else streamed.stored(name),
                      referenced)
        if moe_fits and (o.verify and not o.dense or o.pp > 1):  # the checks below run the model, as small
            torch.manual_seed(o.seed)
            dense = build(mod, o.entry, o.config, o.overrides, "cpu")
            dense_weights.load_into(_unwrapped(dense))
    elif real:
        if dense is None:  # captured on meta: the dense model's parameters were thought too large
            torch.manual_seed(o.seed)
            dense = build(mod, o.entry, o.config, o.overrides, "cpu")
            gm, _ = run_pipeline(capture(dense, example_inputs(mod, dense, BATCH, SEQ)), passes_for(o, plan))
        write_weights(gm, tmp, dtypes)
    if real:
        what = "routers (the dense weights: in the checkpoint)" if o.reference_weights else "dense weights and routers"
        log(f"weights: {(tmp / WEIGHTS).stat().st_size / 2**20:,.1f} MiB of {what} -> {WEIGHTS}, each rank makes its "
            f"experts ({nbytes / 2**20:,.1f} MiB in all) by {RECIPE}")
    else:
        log(f"weights: {stored / 2**30:,.1f} GiB is over --max-weights-gb {o.max_weights_gb}; none written")
    _emit(gm, model, o, mod, tmp)
    if o.pp > 1:
        from moec.cost_model.planner import values_for
        planned = {} if plan is None else dict(values=values_for(plan, shape, o, hardware),
                                               capacity=hardware.memory_bytes)
        report["stage_bounds"] = write_stages(gm, o, shape, tmp, _title(model, o), log, **planned)
        if real and moe_fits:
            report["stages_rel_error"] = err = check_stages(tmp, gm, example_inputs(mod, dense, BATCH, SEQ))
            if not err <= STAGE_TOLERANCE:
                raise MoecError(f"the pipeline stages differ from model.py by {err:.2e} (relative); rerun with "
                                f"--debug and report it")
            log(f"pipeline: the stages run in a row give model.py's logits (max relative error {err:.1e})")
    if o.verify and not o.dense:
        report["verify_max_rel_error"], report["step0_rel_error"] = _verify(
            model, o, mod, dense if moe_fits else None, gm if real and moe_fits else None, tmp, log)
    config = _write_config(tmp, model, o, report, hf_config)
    write_train_program(tmp, config)
    return report


def _bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _reference(streamed: Streamed, names: list, tmp: Path, log) -> dict:
    """Write tmp/dense.json: where each of names (tensors the build stores as the checkpoint holds them) is
    (file, name there), and each such file's size and SHA-256; {name: (file, name there)}."""
    referenced = {n: streamed.where(n) for n in names}
    files = sorted({file for file, _ in referenced.values()})
    record = {"files": {f: {"bytes": os.path.getsize(f), "sha256": sha256(f)} for f in files},
              "tensors": referenced}
    (tmp / REFERENCES).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    log(f"weights: {len(referenced)} dense tensors referenced in {len(files)} file(s), not copied")
    return referenced


def _hardware(o: Options):
    """The profile --gpus plans for, read before the capture so that a wrong --hardware is found at once."""
    from moec.cost_model.hardware import load_hardware

    return load_hardware(o.hardware or "dgx_h100") if o.gpus else None


def _check_against_model(gm, o: Options) -> None:
    """The options the captured model's shapes decide, checked before any pass runs."""
    if o.dense:
        return
    FindFFN()(gm)  # records gm.meta["ffns"], rewriting nothing; the pipeline's find_ffn records them again
    ffns = gm.meta["ffns"]
    for f in ffns:
        o.check_ffn_width(f.w1.fetch(gm).shape[0])
    if not o.moe_layer_indices(len(ffns)):
        raise MoecError(f"--first-dense {o.first_dense} leaves none of the model's {len(ffns)} FFNs to convert")


def _plan(model: str, o: Options, gm, meta_model, tmp: Path, log, hardware):
    """The planner's best plan for --gpus on --hardware among those train.py carries out; plan.json records
    it and the runners-up."""
    from moec.cost_model import rank_plans
    from moec.cost_model.report import write_plan_json
    shape = _shape(model, o, gm, meta_model)
    runnable = lambda plan: not any(o.with_plan(plan).planner_problems())  # noqa: E731
    ranked, enumerated = rank_plans(shape, o, o.gpus, hardware, allowed=runnable)
    write_plan_json(tmp, ranked, enumerated, shape, o)
    log(f"plan: {ranked[0].why}")
    return ranked[0]


def _shape(model: str, o: Options, gm, meta_model):
    """The captured dense model's dimensions, for the cost model."""
    from moec.driver.model_shape import shape_from_graph

    return shape_from_graph(gm, meta_model, f"{Path(model).name}:{o.config or 'default'}", None)


def _emit(gm, model: str, o: Options, mod, directory: Path) -> None:
    """model.py and what it loads (kernels/, source/) into directory."""
    (directory / "model.py").write_text(model_source(gm, _title(model, o), _kernel_modules(gm, directory),
                                                     _user_code(gm, mod, directory), o.recompute))


def _load_program(directory: Path) -> torch.nn.Module:
    """directory/model.py's Model holding directory's weights, its experts upcycled as train.py does."""
    program = import_file(f"moec_emitted_{id(directory)}", directory / "model.py")
    return load_build(program.Model, directory)


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


def _title(model: str, o: Options) -> str:
    if o.dense:
        return f"{Path(model).name} ({o.config or 'default config'}), dense"
    return f"{Path(model).name} ({o.config or 'default config'}) upcycled to {o.experts} experts, top-{o.topk}"


def _write_config(tmp: Path, model: str, o: Options, report: dict, hf_config: dict | None) -> dict:
    """config.json: the options (paths by file name), what the compile found, the moec version, and for a
    Hugging Face model its configuration (what `moec export` maps to an MoE family's)."""
    o = replace(o, weights=o.weights and Path(o.weights).name)
    config = {"moec_version": moec.__version__, "model": Path(model).name, "options": o.to_json(),
              "result": report}
    if hf_config is not None:
        config["hf_config"] = hf_config
    (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    return config


def _verify(model: str, o: Options, mod, dense, upcycled, tmp: Path, log) -> tuple:
    """(max relative error between the dense model's logits and the emitted model.py's holding upcycled
    weights made exact (no noise, capacity, drop-upcycling or scaled weights): a MoecError over the
    tolerance; the build's own step-0 error when its options leave the dense function, else None).
    upcycled: the build's graph when it holds real weights, else None (copies are made for the check, on a
    shrunk config when the weights were too large, and emitted beside)."""
    shrunk = dense is None
    if shrunk:
        shrink = getattr(mod, "VERIFY_OVERRIDES", None)
        if shrink is None:
            log("verify: skipped (weights too large and the model file defines no VERIFY_OVERRIDES)")
            return None, None
        torch.manual_seed(o.seed)
        dense = build(mod, o.entry, o.config, {**o.overrides, **shrink}, "cpu")
    inputs = example_inputs(mod, dense, BATCH, SEQ)
    one_process = replace(o, ep=1, ep_variant="flat", node_size=0, ep_chunks=1)  # the build's math
    # with its pyramid on the last layer, which a shrunk config also has
    single = replace(one_process, pyramid=o.pyramid and (o.pyramid[0], min(o.pyramid[1], 1)))
    exact = replace(single, upcycle_noise=0.0, capacity_factor=0.0, drop_upcycle=0.0, router_weights="renorm",
                    routing="topk")
    dense.eval()  # dropout off: compare the deterministic function
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="verify.", dir=tmp) as scratch:
        ref = logits_of(dense(*inputs))

        def error(options: Options, name: str) -> float:
            """Of the model.py these options emit, holding weights upcycled from dense."""
            if upcycled is not None and options == one_process:
                program = _load_program(tmp)
            else:
                gm, _ = run_pipeline(capture(dense, inputs), passes_for(options))
                _emit(gm, model, options, mod, Path(scratch) / name)
                write_weights(gm, Path(scratch) / name)
                program = _load_program(Path(scratch) / name)
            got = program.eval()(*inputs)["logits"]
            return ((got - ref).abs().max() / ref.abs().max()).item()

        err = error(exact, "exact")
        where = " (on a shrunk config)" if shrunk else ""
        log(f"verify: model.py vs the dense model, logits max relative error {err:.2e}{where}")
        if not err <= VERIFY_TOLERANCE:
            raise MoecError(f"verify: the upcycled model differs from the dense one by {err:.2e} (relative), over "
                            f"{VERIFY_TOLERANCE:.0e}; rerun with --debug and report it, or pass --no-verify")
        start = None
        if single != exact:  # options that leave the dense function by design: how far, reported, not refused
            start = error(single, "as-built")
            log(f"verify: with {', '.join(_inexact(o))} the build starts {start:.2e} (relative) from the dense "
                f"model's logits{where}")
    return err, start


def _inexact(o: Options) -> list[str]:
    """The options that make step 0 differ from the dense model."""
    return [flag for flag, on in (("--upcycle-noise", o.upcycle_noise > 0), ("--capacity-factor", o.capacity_factor > 0),
                                  ("--drop-upcycle", o.drop_upcycle > 0),
                                  ("--router-weights scaled", o.router_weights == "scaled"),
                                  ("--routing expert-choice", o.routing == "expert-choice")) if on]


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameter names dense weights use: a Hugging Face model's own, without LogitsOnly."""
    return model.model if isinstance(model, LogitsOnly) else model


def _hf_config(model: torch.nn.Module) -> dict | None:
    """A Hugging Face model's configuration as its config.json would hold it."""
    if not isinstance(model, LogitsOnly):
        return None
    return json.loads(model.model.config.to_json_string(use_diff=False))
