"""`moec export RUN_OR_BUILD --format F -o DIR`: a build's weights, a run's final.safetensors or one of its
checkpoints (any layout, EP size or plan) as a Hugging Face MoE checkpoint that
transformers.AutoModelForCausalLM.from_pretrained(DIR) loads and that computes what the build's model.py
computes.

Every tensor is accounted for: each one of the source has one place in the format (the dense model's
derived buffers, such as rotary frequency tables, are rebuilt from the configuration), and each tensor
the format needs comes from the source; a leftover or missing one is an error that names it. What the
format cannot express is refused before anything is read (moec.driver.export_formats).

Memory: a safetensors source is read one tensor (an expert's slice alone) at a time, as the export writes
it, one shard of at most SHARD_BYTES at a time; a checkpoint is read whole.

Two rewrites keep the function exact: --router-weights scaled multiplies each expert's gate weight by E/K,
which the experts' down projections take instead; a shared expert's sigmoid gate (qwen2_moe) is zero
(sigmoid 0 = 1/2) and its down projection doubled. deepseek_v3 keeps moec's selection bias, as its
router's e_score_correction_bias.
"""
import json
import math
import re
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, NamedTuple

import torch

import moec
from moec.base.errors import MoecError
from moec.base.files import umask
from moec.base.options import Options
from moec.base.safetensors_io import BY_NAME
from moec.driver.export_formats import Format, check_expressible, choose, config
from moec.driver.inputs import is_build

RECORD = "moec_export.json"  # what an export wrote, so that --force replaces only that
SHARD_BYTES = 5 * 2**30
PREFIX = "model."  # a transformers model's tensors in a build: LogitsOnly's child "model"
MOE = re.compile(r"^model\.model\.layers\.(\d+)\.mlp\.moe\.(.+)$")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


def export(source: str, format_name: str, out: str, force: bool = False, drop_bias: bool = False,
           step: int | None = None, log=print) -> None:
    fmt = choose(format_name)
    build, weights = locate(Path(source), step)
    build_config = json.loads((build / "config.json").read_text())
    options, hf_config = Options.from_json(build_config["options"]), build_config.get("hf_config")
    check_expressible(fmt, options, hf_config)
    out = Path(out)
    _check_out(out, force)
    with ExitStack() as stack:
        tensors, fields = map_tensors(fmt, options, hf_config, _open(weights, stack), drop_bias, log)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".moec-", dir=out.parent))
        try:
            files = _write(tmp, fmt, fields, tensors)
            _finish(tmp, fmt, files)
            _replace(out, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"wrote {out}/ ({fmt.name}, {len(tensors)} tensors, from {weights})")


def _finish(tmp: Path, fmt: Format, files: list[str]) -> None:
    """The record of what the export wrote, and the modes mkdir and open would have given."""
    (tmp / RECORD).write_text(json.dumps({"moec_version": moec.__version__, "format": fmt.name, "files": files},
                                         indent=1) + "\n")
    mask = umask()
    for p in [tmp, *tmp.iterdir()]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def locate(source: Path, step: int | None) -> tuple[Path, Path]:
    """(the build, the weights file or checkpoint dir to export) of a build dir, a run dir or a checkpoint."""
    if is_build(source):
        if step is not None:
            raise MoecError(f"--step picks a checkpoint of a run; {source} is a build: give its run dir")
        from moec.runtime.weights import WEIGHTS
        if not (source / WEIGHTS).is_file():
            raise MoecError(f"{source} has no {WEIGHTS} (compiled over --max-weights-gb): export a run")
        return source, source
    if (source / "manifest.json").is_file():  # a checkpoint: RUN/checkpoints/step_N
        return _build_of(source.parent.parent), source
    if not (source / "run.json").is_file():
        raise MoecError(f"{source}: not a build, a run dir or a checkpoint; give a directory `moec compile` or "
                        f"train.py wrote")
    from moec.runtime.training.checkpoint import Checkpointer

    build, checkpoints = _build_of(source), Checkpointer(source / "checkpoints")
    if step is not None:
        if step not in checkpoints.intact_steps():
            raise MoecError(f"{source} has no intact checkpoint of step {step}; it has: "
                            f"{', '.join(map(str, checkpoints.intact_steps())) or 'none'}")
        return build, source / "checkpoints" / f"step_{step:08d}"
    final, newest = source / "final.safetensors", checkpoints.latest()
    if final.is_file() and (newest is None or final.stat().st_mtime >= (newest / "manifest.json").stat().st_mtime):
        return build, final
    if newest is None:
        raise MoecError(f"{source} has neither final.safetensors nor an intact checkpoint to export")
    return build, newest


def _build_of(run: Path) -> Path:
    try:
        build = Path(json.loads((run / "run.json").read_text())["build"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MoecError(f"{run}/run.json does not name the run's build ({type(e).__name__})") from None
    if not is_build(build):
        raise MoecError(f"{run} is a run of the build {build}, which is no longer there")
    return build


class Lazy(NamedTuple):
    """A tensor known by its shape and dtype, read (sliced, scaled) only when written: read() the whole of it,
    read(i=e) of a source tensor its slice e (one expert)."""
    shape: tuple
    dtype: torch.dtype
    read: Callable[..., torch.Tensor]


def _open(weights: Path, stack: ExitStack) -> dict:
    """The source's tensors by name, as Lazy ones: a safetensors file is read one tensor (or one expert's
    slice) at a time, a checkpoint as a whole, a build's experts made from their dense sources one at a time."""
    if is_build(weights):
        return _open_build(weights, stack)
    if weights.is_dir():
        from moec.runtime.training.checkpoint import read_weights
        state = read_weights(weights)
        return {n: Lazy(tuple(t.shape), t.dtype, lambda t=t, i=None: t if i is None else t[i].clone())
                for n, t in state.items()}
    from safetensors import safe_open
    f = stack.enter_context(safe_open(str(weights), framework="pt"))
    tensors = {}
    for name in f.keys():
        piece = f.get_slice(name)
        tensors[name] = Lazy(tuple(piece.get_shape()), BY_NAME[piece.get_dtype()],
                             lambda n=name, i=None: f.get_tensor(n) if i is None else f.get_slice(n)[i])
    return tensors


def _open_build(build: Path, stack: ExitStack) -> dict:
    from moec.runtime.upcycle import expert_shape, make, make_expert
    from moec.runtime.weights import RECIPE, WEIGHTS, BuildTensors

    files = BuildTensors(build)  # its weights.safetensors, and the dense checkpoint where it references that
    stored = {n: Lazy(files.shape(n), files.dtype(n),
                      lambda n=n, i=None: files.get(n) if i is None else files.get(n)[i]) for n in files.keys()}
    written = json.loads((build / RECIPE).read_text())
    tensors = {n: t for n, t in stored.items() if n not in set(written["sources"])}
    for name, entry in written["experts"].items():
        if entry["source"] not in stored:
            raise MoecError(f"{build / RECIPE}: {name} is made from {entry['source']}, which {WEIGHTS} lacks; "
                            f"compile the build again")
        source = stored[entry["source"]]

        def read(entry=entry, source=source, i=None):
            if i is None:
                return make(entry, source.read(), dtype=source.dtype)
            return make_expert(entry, source.read(), i).to(source.dtype)
        tensors[name] = Lazy(expert_shape(entry, source.shape), source.dtype, read)
    return tensors


def _check_out(out: Path, force: bool) -> None:
    """out is new or empty, or (with force) holds only what an export wrote there."""
    if out.exists() and not out.is_dir():
        raise MoecError(f"-o {out} is a file, not a directory; name a directory for the export")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise MoecError(f"{out} exists and is not empty; pass --force to replace an export moec wrote there")
    try:
        written = set(json.loads((out / RECORD).read_text())["files"]) | {RECORD}
    except (OSError, ValueError, KeyError, TypeError):
        raise MoecError(f"-o {out}: --force replaces only an export moec wrote, and {out} has no {RECORD}; it is "
                        f"left as it is: name a new or empty directory") from None
    other = sorted(p.name for p in out.iterdir() if p.name not in written)
    if other:
        raise MoecError(f"-o {out} holds {other[0]}, which moec did not write; it is left as it is: move it or "
                        f"name another directory")


def _replace(out: Path, tmp: Path) -> None:
    """Put tmp at out by renames: the old export (if any) goes only once the new one is complete."""
    trash = None
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=".moec-", dir=out.parent))
        out.rename(trash / "old")
    try:
        tmp.rename(out)
    except BaseException:
        if trash is not None:
            (trash / "old").rename(out)
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def _dense_model(hf_config: dict):
    """The build's dense transformers model on the meta device: the names and derived buffers it has."""
    import transformers

    cfg = transformers.CONFIG_MAPPING[hf_config["model_type"]].from_dict(hf_config)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


def map_tensors(fmt: Format, o: Options, hf_config: dict, source: dict, drop_bias: bool, log) -> tuple:
    """(the format's tensors by name, and its config.json fields) from the build's tensors, all Lazy; every
    tensor of source is used once or named in an error, and so is every one the format needs."""
    dense = _dense_model(hf_config)
    persistent = dense.state_dict()
    derived = {n for n, _ in dense.named_buffers()} - set(persistent)
    left = dict(source)
    stray = next((n for n in left if ".moe." in n and not MOE.match(n)), None)
    if stray is not None:
        raise MoecError(f"{stray}: an MoE layer outside model.layers.I.mlp, which {fmt.name} has no place for")
    layers = sorted({int(MOE.match(n).group(1)) for n in left if MOE.match(n)})
    out, widths = {}, {"dense": hf_config.get("intermediate_size"), "shared": None}
    for i in layers:
        widths.update(_moe_layer(fmt, o, i, left, out, drop_bias, log))
    for name in sorted(left):
        inner = name[len(PREFIX):] if name.startswith(PREFIX) else None
        if inner in persistent:
            out[inner] = left.pop(name)
        elif inner in derived:
            left.pop(name)  # rebuilt from the configuration
    if left:
        raise MoecError(f"{next(iter(sorted(left)))}: a tensor of the checkpoint that {fmt.name} has no place for")
    _check_complete(dense, persistent, out, layers)
    dense_layers = [i for i in range(hf_config["num_hidden_layers"]) if i not in layers]
    if dense_layers and not fmt.dense_layers:
        first = dense_layers == list(range(len(dense_layers)))
        if not (fmt.first_dense and first):
            raise MoecError(f"layer {dense_layers[0]} is dense: every layer of {fmt.name} "
                            f"{'after the first dense ones ' if fmt.first_dense else ''}is an MoE layer")
    dtype = str(next(iter(out.values())).dtype).removeprefix("torch.")
    return out, config(fmt, o, hf_config, widths, dense_layers, dtype)


def _moe_layer(fmt: Format, o: Options, i: int, left: dict, out: dict, drop_bias: bool, log) -> dict:
    """Layer i's router, experts and shared expert from left into out; their widths."""
    def take(part):
        name = f"model.model.layers.{i}.mlp.moe.{part}"
        if name not in left:
            raise MoecError(f"the checkpoint lacks {name}, which {fmt.name}'s layer {i} needs")
        return left.pop(name)

    block = fmt.moe_block.format(i)
    out[f"{block}.{fmt.router}"] = take("router.weight")
    bias_name = f"model.model.layers.{i}.mlp.moe.router.bias"
    if fmt.selection_bias is not None:  # moec's is the format's; without one (--expert-bias-rate 0), zero
        E = out[f"{block}.{fmt.router}"].shape[0]
        out[f"{block}.{fmt.selection_bias}"] = left.pop(bias_name) if bias_name in left else \
            Lazy((E,), torch.float32, lambda: torch.zeros(E))
    elif bias_name in left:
        bias = left.pop(bias_name).read()
        if bias.any() and not drop_bias:
            raise MoecError(f"{bias_name} is not zero: {fmt.name} chooses experts without a selection bias; "
                            f"compile with --expert-bias-rate 0, or export with --drop-bias (its routing then "
                            f"differs from the trained model's)")
        if bias.any():
            log(f"export: --drop-bias: layer {i}'s selection bias (max |b| {bias.abs().max().item():.2e}) dropped")
    w1, w2 = take("experts.w1"), take("experts.w2")  # [E, F, D], [E, D, F]
    if f"model.model.layers.{i}.mlp.moe.experts.w3" not in left:
        raise MoecError(f"layer {i}'s experts are not gated (no experts.w3): {fmt.name}'s experts are gated MLPs")
    w3 = take("experts.w3")
    E, F, D = w1.shape
    if E != o.experts * o.granularity:
        raise MoecError(f"layer {i} has {E} experts, not the {o.experts * o.granularity} of the build's options: "
                        f"{fmt.name} has one expert count for every layer")
    scale = o.experts / o.topk if o.router_weights == "scaled" else 1.0
    gate, up, down = fmt.expert
    for e in range(E):  # each expert's slice read on its own, when written
        out[f"{block}.{gate.format(e)}"] = Lazy((F, D), w1.dtype, lambda e=e: w1.read(i=e))
        out[f"{block}.{up.format(e)}"] = Lazy((F, D), w3.dtype, lambda e=e: w3.read(i=e))
        out[f"{block}.{down.format(e)}"] = Lazy((D, F), w2.dtype, lambda e=e: w2.read(i=e) * scale)
    widths = {"expert": F}
    if fmt.shared is not None:  # the format always has one: without moec's, it is zero units wide
        zeros = lambda *shape: Lazy(shape, w1.dtype, lambda i=None: torch.zeros(shape, dtype=w1.dtype))
        s1, s3, s2 = (take("shared.w1"), take("shared.w3"), take("shared.w2")) if o.shared_experts else \
            (zeros(0, D), zeros(0, D), zeros(D, 0))
        shared = f"{block}.{fmt.shared}"
        out[f"{shared}.gate_proj.weight"], out[f"{shared}.up_proj.weight"] = s1, s3
        if fmt.shared_gate is None:
            out[f"{shared}.down_proj.weight"] = s2
        else:
            out[f"{shared}.down_proj.weight"] = Lazy(s2.shape, s2.dtype, lambda: s2.read() * 2)  # the gate halves it
            out[f"{block}.{fmt.shared_gate}"] = Lazy((1, D), w1.dtype, lambda: torch.zeros(1, D, dtype=w1.dtype))
        widths["shared"] = s1.shape[0]
    return widths


def _check_complete(dense, persistent: dict, out: dict, layers: list[int]) -> None:
    """Every tensor of the dense model is in out, but the FFNs the MoE layers replaced and one of each set of
    tied tensors (the format ties them the same way)."""
    tied = {}
    for name, p in dense.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    replaced = tuple(f"model.layers.{i}.mlp." for i in layers)
    for name in persistent:
        if name in out or name.startswith(replaced):
            continue
        group = next((g for g in tied.values() if name in g), [name])
        if not any(n in out for n in group):
            raise MoecError(f"the checkpoint lacks {PREFIX}{name}, which the exported model needs")
    for group in tied.values():  # the source of a tie once, as save_pretrained writes it
        for name in [n for n in group if n in out][1:]:
            del out[name]


def _write(directory: Path, fmt: Format, fields: dict, tensors: dict) -> list[str]:
    """config.json and the safetensors (one file, or shards of at most SHARD_BYTES with their index); the
    names of the files written."""
    import transformers
    from safetensors.torch import save_file

    cfg = transformers.CONFIG_MAPPING[fmt.name].from_dict(fields)
    cfg.architectures = [ARCHITECTURES[fmt.name]]
    cfg.save_pretrained(directory)
    nbytes = {n: math.prod(t.shape) * t.dtype.itemsize for n, t in tensors.items()}
    shards, size = [[]], 0
    for name in sorted(tensors):
        if shards[-1] and size + nbytes[name] > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for file, names in zip(files, shards):  # one shard in memory at a time
        save_file({n: tensors[n].read().contiguous() for n in names}, str(directory / file),
                  metadata={"format": "pt"})
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(nbytes.values())},
                 "weight_map": {n: f for f, names in zip(files, shards) for n in names}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append("model.safetensors.index.json")
    return sorted(["config.json", *files])
