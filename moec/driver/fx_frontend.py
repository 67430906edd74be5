"""The fallback front-end: torch.fx.symbolic_trace, lowered to the same ATen IR.

capture() calls it when non-strict torch.export rejects a model. symbolic_trace
runs nothing, so it gets past what export must execute or flatten:
  - an output export cannot flatten (a dataclass or other unregistered class):
    the first tensor in it is taken as the logits;
  - operators and functions fake tensors cannot run: a torch.library op with
    no fake kernel, or a function the model file marks `torch.fx.wrap("name")`
    because it has data-dependent control flow or calls an extension. These
    stay single opaque nodes (moec.runtime.ops.opaque); their output shapes come from
    running them once on zeros on the CPU, and an output size equal to an
    input's at the same position keeps that input's symbolic size.
The traced graph is then replayed under make_fx (pre-dispatch, the level
export works at) on fake tensors with symbolic batch and sequence sizes, each
node keeping the module path symbolic_trace recorded. Modules symbolic_trace
cannot enter (Python control flow on shapes, tuple-unpacked sizes) are export's
ground; the fallback does not try to help there.
"""
import torch
import torch.fx
import torch.fx.traceback as fx_traceback
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, get_proxy_mode, make_fx, track_tensor_tree
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.nn.utils import stateless

from moec.base.errors import MoecError
from moec.driver.capture import logits_of
from moec.runtime.ops.opaque import opaque_call, qualified_name


def symbolic_capture(model: torch.nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    """ATen GraphModule of `model` on `inputs`, parameters as get_attr nodes; gm.meta["opaque"] names the
    callables kept opaque (the emitted program must import the model file to run them)."""
    traced = torch.fx.symbolic_trace(model)
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    names_of = {}  # tied parameters: one graph input, every name kept
    for name, t in state.items():
        names_of.setdefault(id(t), []).append(name)
    unique = {names[0]: state[names[0]] for names in names_of.values()}
    mode = FakeTensorMode(shape_env=ShapeEnv())
    fake_state = {n: mode.from_tensor(t, static_shapes=True) for n, t in unique.items()}
    fake_inputs = [mode.from_tensor(t) for t in inputs]  # batch and sequence symbolic
    replay = _Replay(traced)

    def run(params, *args):
        full = {n: params[names[0]] for names in names_of.values() for n in names}
        with stateless._reparametrize_module(traced, full), fx_traceback.preserve_node_meta():
            return logits_of(replay.run(*args))

    with mode:
        lowered = make_fx(run, pre_dispatch=True)(fake_state, *fake_inputs)
    gm = _with_attrs(lowered, model, {n: names_of[id(t)] for n, t in state.items()}, unique)
    gm.meta["opaque"] = sorted(replay.opaque)
    return gm


class _Replay(torch.fx.Interpreter):
    """Runs the traced graph on fake tensors; a call fake tensors cannot run becomes one opaque node."""

    def __init__(self, gm):
        super().__init__(gm)
        self.opaque: set[str] = set()

    def call_function(self, target, args, kwargs):
        try:
            return super().call_function(target, args, kwargs)
        except Exception as e:  # no fake kernel, data-dependent code, an extension: try it as an opaque call
            fake_error = e
        name = qualified_name(target)
        rule = _rule(target, args, kwargs, self.node, fake_error)
        with disable_proxy_modes_tracing():
            out = opaque_call(name, rule, *args, **kwargs)
        tracer = get_proxy_mode().tracer
        proxy = tracer.create_proxy("call_function", opaque_call, *pytree.tree_map(
            tracer.unwrap_proxy, ((name, rule, *args), kwargs)))
        self.opaque.add(name)
        return track_tensor_tree(out, proxy, constant=None, tracer=tracer)

    def run_node(self, n):
        self.node = n
        with fx_traceback.set_current_meta(n):
            return super().run_node(n)


def _rule(target, args, kwargs, node, fake_error) -> tuple:
    """opaque_call's shape rule, from running the call once on zeros on the CPU. An output size is taken
    from the tensor argument of the same rank that agrees with it in most places, position by position
    (matching by value alone would mistake a hidden size equal to the sequence length for it); sizes
    no argument has stay constants."""
    hint = lambda s: s.node.hint if isinstance(s, torch.SymInt) else s
    with disable_proxy_modes_tracing(), unset_fake_temporarily():
        real = pytree.tree_map(
            lambda a: torch.zeros([hint(s) for s in a.shape], dtype=a.dtype) if isinstance(a, torch.Tensor)
            else hint(a), (args, kwargs))
        try:
            out = target(*real[0], **real[1])
        except Exception as e:
            raise MoecError(f"at `{node.format_node()}`: fake tensors cannot run it "
                            f"({type(fake_error).__name__}: {_first_line(fake_error)}) and it fails on zeros "
                            f"({type(e).__name__}: {_first_line(e)})") from e
    single = isinstance(out, torch.Tensor)
    outputs = []
    for o in ([out] if single else out if isinstance(out, (tuple, list)) else [None]):
        if not isinstance(o, torch.Tensor):
            raise MoecError(f"at `{node.format_node()}`: it returns a {type(out).__name__}, not a tensor "
                            f"or a tuple of tensors")
        candidates = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim() == o.dim()]
        agree = lambda i: sum(hint(a) == b for a, b in zip(args[i].shape, o.shape))
        like = max(candidates, key=agree, default=None)
        sizes = tuple(None if like is not None and hint(args[like].shape[d]) == s else s
                      for d, s in enumerate(o.shape))
        outputs.append((0 if like is None else like, sizes, str(o.dtype).removeprefix("torch.")))
    return single, tuple(outputs)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _with_attrs(gm: torch.fx.GraphModule, model, group: dict, unique: dict) -> torch.fx.GraphModule:
    """Parameter inputs become get_attr nodes under their module paths, as torch.export leaves them;
    group: every parameter and buffer name, in the model's order, with the names that share its tensor."""
    from moec.base.graph import get_param, set_param

    buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    for name, names in group.items():
        set_param(gm, name, unique[names[0]].detach(), buffer=name in buffers)
        if name != names[0]:  # tied: the same parameter object under both names
            *path, leaf = name.split(".")
            owner = get_param(gm, ".".join(path)) if path else gm
            (owner._buffers if name in buffers else owner._parameters)[leaf] = get_param(gm, names[0])
    graph = gm.graph
    for node, name in zip([n for n in graph.nodes if n.op == "placeholder"], unique):
        with graph.inserting_before(node):
            attr = graph.get_attr(name)
        attr.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm
