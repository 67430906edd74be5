"""Capture: a user's model.py -> a plain GraphModule with shapes on every node.

The one entry point passes rely on is `capture(model, inputs)`: non-strict
torch.export, or, when export rejects the model, the torch.fx.symbolic_trace
front-end (moec/fx_frontend.py), which gives the same ATen-level IR with module
provenance; gm.meta["frontend"] says which ran. When both fail the error gives
export's reason, with the user's line, and symbolic_trace's.
After capture the graph takes the token ids and returns {"logits": ...};
device arguments baked in at trace time follow the input's device instead.
"""
import contextlib
import dataclasses
import importlib.util
import inspect
import operator
import sys
import traceback
from pathlib import Path

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from moec.base.errors import MoecError
from moec.base.graph import propagate_shapes
from moec.driver.hf_dir import is_hf_dir, load_hf_dir


def load_module(path: str):
    """Import a model file by path (errors name the file and line), or stand in for one when path is a Hugging
    Face checkpoint directory (moec.driver.hf_dir)."""
    p = Path(path)
    if is_hf_dir(p):
        return load_hf_dir(path)
    if not p.is_file():
        what = "a directory without config.json" if p.is_dir() else "no such file"
        raise MoecError(f"{path}: {what}; give the path of a Python file that defines the model, or of a "
                        f"Hugging Face checkpoint directory")
    name = f"moec_user_{p.stem.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(name, p)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(p.parent.resolve()))
    sys.modules[name] = mod  # what the model file defines can be found by name (pickling, emitted imports)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # the user's code: report where it broke
        del sys.modules[name]
        raise MoecError(f"{path}:{_user_line(e, p)}: importing it failed: {type(e).__name__}: {e}") from e
    finally:
        sys.path.pop(0)
    return mod


def _user_line(exc: BaseException, path: Path) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    if isinstance(exc, SyntaxError) and exc.lineno:
        return str(exc.lineno)
    return str(frames[-1].lineno) if frames else "?"


class _ParamsOnMeta:
    """Within it, a parameter a module registers goes to the meta device and its buffers stay where they are
    made: a model's own tables (rotary frequencies, masks) without memory for its weights (the CPU memory
    a parameter is first made in is never written, and is freed at once)."""

    def __enter__(self):
        self.register = register = torch.nn.Module.register_parameter

        def on_meta(module, name, param):
            if param is not None and not param.is_meta:
                param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
            register(module, name, param)

        torch.nn.Module.register_parameter = on_meta

    def __exit__(self, *exc):
        torch.nn.Module.register_parameter = self.register


def build(mod, entry: str, config: str | None, overrides: dict, device: str) -> torch.nn.Module:
    factory = getattr(mod, entry, None)
    if not callable(factory):
        raise MoecError(f"{mod.__file__}: defines no factory '{entry}'; add `def {entry}(config=None, **overrides)` "
                        f"or name yours with --entry")
    kwargs = dict(overrides)
    if config is not None:
        configs = getattr(mod, "CONFIGS", None)
        if configs is not None and config not in configs:
            raise MoecError(f"unknown --config '{config}'; this model defines: {', '.join(configs)}")
        kwargs["config"] = config
    shell = device == "shell"  # parameters on meta, buffers on the CPU
    with torch.device("cpu" if shell else device), _ParamsOnMeta() if shell else contextlib.nullcontext():
        try:
            model = factory(**kwargs)
        except TypeError as e:
            raise MoecError(f"{entry}({', '.join(kwargs)}) failed: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise MoecError(f"{entry}() returned {type(model).__name__}, not a torch.nn.Module")
    return _logits_only(model)


class LogitsOnly(torch.nn.Module):
    """A Hugging Face causal LM with its KV cache off, returning logits alone."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def _logits_only(model):
    cfg = getattr(model, "config", None)
    return LogitsOnly(model) if hasattr(cfg, "use_cache") and hasattr(model, "generation_config") else model


def vocab_size(model: torch.nn.Module) -> int:
    emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    if emb is None:
        raise MoecError("cannot tell the vocabulary size (no nn.Embedding); define example_inputs(batch, seq) "
                        "in the model file")
    return emb.num_embeddings


def example_inputs(mod, model, batch: int, seq: int, device: str = "cpu") -> tuple:
    """The model file's example_inputs(batch, seq), or token ids in [0, vocab)."""
    fn = getattr(mod, "example_inputs", None)
    if fn is not None:
        params = inspect.signature(fn).parameters
        kw = {"vocab_size": vocab_size(model)} if "vocab_size" in params else {}
        inputs = tuple(fn(batch, seq, **kw))
    else:
        inputs = (torch.randint(0, vocab_size(model), (batch, seq)),)
    return tuple(t.to(device) for t in inputs)


def capture(model: torch.nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    # batch and sequence stay symbolic, so the program trains and evaluates at any size
    dims = tuple({i: torch.export.Dim.AUTO for i in range(t.dim())} for t in inputs)
    export = lambda: torch.export.export(model, inputs, dynamic_shapes=dims, strict=False).module()
    try:
        gm, frontend = export(), "torch.export"
    except Exception as export_error:
        gm, frontend = _eval_mode_export(model, export, export_error), EVAL_FRONTEND
        if gm is None:
            gm, frontend = _fallback(model, inputs, export_error), "torch.fx.symbolic_trace"
    _normalise(gm)
    gm.meta["frontend"] = frontend
    gm.meta["inputs"] = [(tuple(t.shape), t.dtype) for t in inputs]
    propagate_shapes(gm)
    return gm


def logits_of(out) -> torch.Tensor:
    """The first tensor in what a model returns (a tensor, a tuple, a dict, a dataclass or another object)."""
    found = _first_tensor(out)
    if found is None:
        raise MoecError(f"the model returned a {type(out).__name__}, which holds no tensor")
    return found


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if dataclasses.is_dataclass(out):
        items = [getattr(out, f.name) for f in dataclasses.fields(out)]
    elif isinstance(out, (tuple, list, dict)):
        items = torch.utils._pytree.tree_leaves(out)
    elif hasattr(out, "__dict__"):
        items = list(vars(out).values())
    else:
        return None
    return next((t for t in map(_first_tensor, items) if t is not None), None)


EVAL_FRONTEND = "torch.export in eval mode (training mode branches on random data: no dropout in the graph)"


def _eval_mode_export(model, export, export_error: Exception) -> torch.fx.GraphModule | None:
    """The graph of the model in eval mode, when training mode failed only on a branch over data (OPT's
    layer drop draws torch.rand([]) and compares it in Python, even at layerdrop 0); None otherwise."""
    if not (model.training and isinstance(export_error, GuardOnDataDependentSymNode)):
        return None
    model.eval()
    try:
        return export()
    except Exception:
        return None
    finally:
        model.train()


def _fallback(model, inputs, export_error: Exception) -> torch.fx.GraphModule:
    from moec.driver.fx_frontend import symbolic_capture  # here: it imports logits_of from this module
    try:
        return symbolic_capture(model, inputs)
    except Exception as e:
        why = str(e).splitlines()[0] if isinstance(e, MoecError) else _capture_message(e)  # fx appends notes
        if isinstance(e, torch.fx.proxy.TraceError):
            why += " (move that code into a function the model file marks with torch.fx.wrap(\"name\"))"
        raise MoecError(f"capture failed: torch.export: {_capture_message(export_error)}; "
                        f"torch.fx.symbolic_trace: {why}") from e


def _is_user_frame(filename: str) -> bool:
    """Not torch, moec, an installed package, or code made at run time (`<string>`)."""
    parts = Path(filename).parts
    return not filename.startswith("<") and not {"site-packages", "torch", "moec"} & set(parts)


def _capture_message(e: Exception) -> str:
    """Name the user's line that made export fail."""
    user = [f for f in traceback.extract_tb(e.__traceback__) if _is_user_frame(f.filename)]
    where = f"{user[-1].filename}:{user[-1].lineno}: `{user[-1].line}`: " if user else ""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{where}{type(e).__name__}: {first}"


SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _dropout_follows_mode(g: torch.fx.Graph) -> None:
    """Tracing bakes the model's mode into dropout (train=True, or attention's dropout_p where the model
    chose it from self.training); read the module's `training` flag instead, so model.eval() turns
    dropout off in the graph and in the emitted model."""
    dropouts = [n for n in g.nodes if n.op == "call_function" and n.target == torch.ops.aten.dropout.default]
    attention = [n for n in g.nodes if n.op == "call_function" and n.target == SDPA and _sdpa_p(n)]
    if not dropouts and not attention:
        return
    modal = set(dropouts) | set(attention)
    with g.inserting_before(next(n for n in g.nodes if n in modal)):
        training = g.create_node("get_attr", "training", name="training")
    training.meta.update(val=None, nn_module_stack={})
    for n in dropouts:
        n.args = (n.args[0], n.args[1], training)
    for n in attention:
        with g.inserting_before(n):
            p = g.call_function(operator.mul, (training, _sdpa_p(n)))  # p in training, 0 in eval
        p.meta.update({k: n.meta[k] for k in ("nn_module_stack", "stack_trace") if k in n.meta})
        if len(n.args) > 4:
            n.args = (*n.args[:4], p, *n.args[5:])
        else:
            n.kwargs = {**n.kwargs, "dropout_p": p}


def _sdpa_p(n: torch.fx.Node) -> float:
    p = n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0)
    return p if isinstance(p, float) else 0.0


def _device_from_input(g: torch.fx.Graph) -> None:
    """A device the trace baked in becomes the device of the graph's first tensor input: the program runs
    where its inputs are."""
    first = next((n for n in g.nodes if n.op == "placeholder"  # a symbolic trace's inputs have no "val"
                  and ("val" not in n.meta or isinstance(n.meta["val"], torch.Tensor))), None)
    device = None
    for n in list(g.nodes):
        if any(isinstance(a, torch.device) for a in (*n.args, *n.kwargs.values())):
            if first is None:
                raise MoecError(f"the model makes a tensor ({n.name}) on a device inside an autocast or no_grad "
                                f"region that takes no tensor, so the trace fixed the device: make it before the "
                                f"region and pass it in")
            if device is None:
                with g.inserting_after(first):
                    device = g.call_function(getattr, (first, "device"))
            n.args = tuple(device if isinstance(a, torch.device) else a for a in n.args)
            n.kwargs = {k: device if isinstance(a, torch.device) else a for k, a in n.kwargs.items()}


def _aliases(op) -> bool:
    """Whether an op's output may share memory with an input (a view, or an in-place op's self)."""
    return isinstance(op, torch._ops.OpOverload) and any(r.alias_info is not None for r in op._schema.returns)


def _functional_inplace(g: torch.fx.Graph) -> None:
    """`a.add_(b)` on a fresh intermediate that nothing views becomes `a2 = a + b`, later readers of `a`
    reading a2: an in-place op on an FFN's output would otherwise modify the MoE layer's output in place,
    which autograd forbids for a custom op's result (Falcon adds attention into its MLP output so)."""
    order = {n: i for i, n in enumerate(g.nodes)}
    for n in list(g.nodes):
        op = n.target
        if n.op != "call_function" or not isinstance(op, torch._ops.OpOverload) or not op._opname.endswith("_") \
                or not _aliases(op) or not n.args or not isinstance(n.args[0], torch.fx.Node):
            continue
        a = n.args[0]
        if a.op != "call_function" or _aliases(a.target) or any(_aliases(u.target) for u in a.users if u is not n):
            continue
        functional = getattr(getattr(torch.ops.aten, op._opname[:-1], None), op._overloadname, None)
        if functional is None:
            continue
        with g.inserting_after(n):
            new = g.call_function(functional, n.args, n.kwargs)
        new.meta.update(n.meta)
        for u in list(a.users):
            if u is not n and u is not new and order[u] > order[n]:
                u.replace_input_with(a, new)
        n.replace_all_uses_with(new)
        g.erase_node(n)


def _drop_dtype_checks(g: torch.fx.Graph) -> None:
    """export asserts each tensor's traced dtype and device before a cast; the program runs in the dtype
    and on the device training chooses (bf16 on a GPU), where the float32 it traced would fail them."""
    for n in list(g.nodes):
        if n.op == "call_function" and n.target == torch.ops.aten._assert_tensor_metadata.default:
            g.erase_node(n)


def _constants_as_buffers(gm: torch.fx.GraphModule) -> None:
    """A tensor the graph reads that is neither a parameter nor a buffer (a constant export lifted, such
    as BLOOM's or GPT-J's, on some torch versions) becomes a buffer of its module, so it is written with
    the weights and moved with the model."""
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        owner_path, _, name = n.target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        value = getattr(owner, name, None)
        if isinstance(value, torch.Tensor) and name not in owner._parameters and name not in owner._buffers:
            delattr(owner, name)
            owner.register_buffer(name, value.detach().clone())


def _normalise(gm: torch.fx.GraphModule) -> None:
    g = gm.graph
    _constants_as_buffers(gm)
    g._codegen = torch.fx.graph.CodeGen()  # flat inputs, whatever the output node holds
    for n in list(g.nodes):
        if n.op == "call_module" and n.target == "_guards_fn":
            g.erase_node(n)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm._forward_pre_hooks.clear()  # export's input checks; the emitted program is shape-generic
    for name in ("train", "eval"):  # export forbids switching modes; dropout reads the mode (below)
        gm.__dict__.pop(name, None)
    regions = [m for m in gm.children() if isinstance(m, torch.fx.GraphModule)]  # autocast, no_grad calls
    for graph in [g] + [m.graph for m in regions]:
        _device_from_input(graph)
        _functional_inplace(graph)
        _drop_dtype_checks(graph)
    for m in regions:
        m.recompile()
    _dropout_follows_mode(g)
    out = next(n for n in g.nodes if n.op == "output")
    flat = torch.utils._pytree.tree_leaves(out.args[0])
    out.args = ({"logits": flat[0]},)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
