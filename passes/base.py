"""What every pass is, and the contract the pass manager (moec.driver.pipeline) holds it to.

A pass is a named callable GraphModule -> PassResult that reads only its own
options (given at construction), never global state. It declares the facts it
reads and writes: `requires` and `provides` name entries of gm.meta (FACTS
below says what each holds); the manager checks both, so passes cannot depend
on an order nobody wrote down. The manager, not the pass, lints, recompiles
and propagates shapes after it, and names it in any failure. An analysis (a
pass that rewrites nothing) says what it found in `report`, which the IR dump
prints. Nodes a pass creates carry the provenance (module path, source line)
of the nodes they replace: create them inside `inherit_provenance`.
"""
import contextlib
from dataclasses import dataclass

import torch.fx

import moec.runtime.ops  # noqa: F401  registers the moec:: ops passes match and create

# gm.meta entries passes share: name -> what it holds
FACTS = {
    "ffns": "find_ffn.FFN records of the dense FFN blocks, in graph order",
    "ffn_inputs": "{FFN module: [N, D] float32 rows of its input on calibration tokens} (empty without weights)",
    "moe_layers": "module paths of the FFNs ffn_to_moe turned into MoE layers",
    "kernels": "{module name: source} of the generated Triton kernels the graph calls",
    "dense_values": "for a graph on the meta device whose dense weights are in a checkpoint: a function from a "
                    "tensor's name to its float32 value, read when asked (a whole model's weights are never held)",
    "initial_values": "{name: value} of the tensors passes made (routers, their biases, hash tables) in a graph "
                      "on the meta device that has dense_values",
}
PROVENANCE = ("nn_module_stack", "stack_trace")


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool


class Pass:
    name = "pass"
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def warnings(self, gm: torch.fx.GraphModule) -> list[str]:
        """Lines the user should see as the pass runs: what it left alone, and why."""
        return []

    def report(self, gm: torch.fx.GraphModule) -> list[str]:
        """Lines saying what the pass found or decided, for the IR dump (analyses)."""
        return []


def _within(stack: dict, module: str | None) -> dict:
    """The nn_module_stack entries down to `module` (all of them when module is None or absent)."""
    if module is None or not any(path == module for path, _ in stack.values()):
        return dict(stack)
    out = {}
    for key, (path, kind) in stack.items():
        out[key] = (path, kind)
        if path == module:
            break
    return out


@contextlib.contextmanager
def inherit_provenance(graph: torch.fx.Graph, source: torch.fx.Node | None, module: str | None = None):
    """Nodes created in the block take source's provenance, its module stack cut at `module` (the
    module the new nodes stand for, e.g. the FFN an MoE layer replaces); source None: the model's root."""
    before = set(graph.nodes)
    yield
    meta = {} if source is None else source.meta
    for node in graph.nodes:
        if node not in before:
            node.meta.setdefault("nn_module_stack", _within(meta.get("nn_module_stack", {}), module))
            if meta.get("stack_trace"):
                node.meta.setdefault("stack_trace", meta["stack_trace"])
