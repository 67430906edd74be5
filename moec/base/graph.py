"""Graph helpers shared by capture and the passes."""
import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode


def propagate_shapes(gm: torch.fx.GraphModule) -> None:
    """Set node.meta["val"] on every node by running the graph on fake tensors.

    The first call keeps the values torch.export left on the nodes (in its
    fake mode, with symbolic batch and sequence sizes) or, when there are none,
    runs the whole graph; later calls (after a pass added
    nodes) compute only the nodes that have no value yet, in the same fake
    mode, so a pass costs what it changed rather than the model's size.
    """
    mode = gm.meta.get("fake_mode")
    if mode is None:
        mode = gm.meta["fake_mode"] = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes])
        if mode is None:
            device = next((t.device for t in gm.state_dict().values()), torch.device("cpu"))
            mode = gm.meta["fake_mode"] = FakeTensorMode(allow_non_fake_inputs=True)
            with mode:
                inputs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in gm.meta["inputs"]]
                _ValuesOnly(gm).run(*inputs)
        for node in gm.graph.nodes:  # values that are not tensors (devices, submodules) stay None
            node.meta.setdefault("val", None)
        return
    fetch = lambda a: a.meta["val"] if isinstance(a, torch.fx.Node) else a
    with mode:
        for node in gm.graph.nodes:
            if "val" in node.meta or node.op in ("placeholder", "output"):
                continue
            if node.op == "get_attr":
                attr = get_param(gm, node.target)
                node.meta["val"] = mode.from_tensor(attr, static_shapes=True) if isinstance(attr, torch.Tensor) else None
            elif node.op == "call_function":
                args, kwargs = torch.fx.node.map_aggregate((node.args, node.kwargs), fetch)
                node.meta["val"] = node.target(*args, **kwargs)


class _ValuesOnly(torch.fx.Interpreter):
    """Records each node's fake value, nothing else (ShapeProp's tensor metadata costs
    seconds on a 70B graph and nobody reads it); values that are not tensors stay None."""

    def run_node(self, node):
        result = super().run_node(node)
        node.meta["val"] = result if isinstance(result, (torch.Tensor, tuple, list)) else None
        return result


def get_param(gm: torch.nn.Module, fqn: str) -> torch.Tensor:
    *path, leaf = fqn.split(".")
    mod = gm
    for p in path:
        mod = getattr(mod, p)
    return getattr(mod, leaf)


def set_param(gm: torch.nn.Module, fqn: str, value: torch.Tensor, buffer: bool = False) -> None:
    """Register a parameter (or buffer) at a dotted path, creating empty modules on the way."""
    *path, leaf = fqn.split(".")
    mod = gm
    for p in path:
        if not hasattr(mod, p):
            mod.add_module(p, torch.nn.Module())
        mod = getattr(mod, p)
    if buffer:
        mod.register_buffer(leaf, value)
    else:
        mod.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=value.is_floating_point()))


def delete_unused_attrs(gm: torch.fx.GraphModule) -> None:
    """Drop parameters and buffers no get_attr node reads any more, and modules left empty."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for fqn, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if fqn not in used:
            *path, leaf = fqn.split(".")
            owner = get_param(gm, ".".join(path)) if path else gm
            if leaf in owner._parameters:
                del owner._parameters[leaf]
            elif leaf in owner._buffers:
                del owner._buffers[leaf]
    for name, mod in sorted(gm.named_modules(), key=lambda kv: -kv[0].count(".")):
        if name and not any(True for _ in mod.children()) and not mod._parameters and not mod._buffers:
            *path, leaf = name.split(".")
            parent = get_param(gm, ".".join(path)) if path else gm
            if type(mod) is torch.nn.Module:
                delattr(parent, leaf)
