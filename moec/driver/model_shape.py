"""Read the cost model's ModelShape off a captured dense model.

Layers, hidden and FFN widths, gating and vocabulary come from the graph
(find_ffn's matches and the logits); heads and sequence length, which the
graph does not name, from the model's config attributes when it has them.
"""
import torch

from moec.driver.capture import build, capture, example_inputs, load_module
from moec.cost_model.known_models import KNOWN_MODELS
from moec.cost_model.cli import known_or_json_shape
from moec.cost_model.shape import ModelShape
from moec.passes.find_ffn import FindFFN

_HEADS = ("n_heads", "n_head", "num_attention_heads")
_KV_HEADS = ("n_kv_heads", "num_key_value_heads")
_SEQ = ("max_seq_len", "block_size", "n_positions", "max_position_embeddings")


def _config_attr(model, names, default):
    for obj in (model, getattr(model, "model", None)):
        cfg = getattr(obj, "config", None)
        for name in names:
            if cfg is not None and isinstance(getattr(cfg, name, None), int):
                return getattr(cfg, name)
    return default


def shape_from_model(path: str, config: str | None, seq_len: int | None, entry: str = "build_model",
                     overrides: dict | None = None) -> ModelShape:
    """`moec plan`'s shape provider: a known model, a ModelShape JSON, or a model file to capture
    (its config changed by overrides, as `moec compile --set` does)."""
    if path in KNOWN_MODELS or path.endswith(".json"):
        return known_or_json_shape(path, config, seq_len)
    mod = load_module(path)
    model = build(mod, entry, config, overrides or {}, "meta")
    gm = capture(model, example_inputs(mod, model, 2, 16, "meta"))
    return shape_from_graph(gm, model, f"{path}:{config or 'default'}", seq_len)


def shape_from_graph(gm, model, name: str, seq_len: int | None) -> ModelShape:
    """The dense model's dimensions, from a freshly captured graph."""
    if "ffns" not in gm.meta:
        FindFFN()(gm)
    ffns = gm.meta["ffns"]
    widths = [f.w1.fetch(gm).shape[0] for f in ffns]
    logits = next(n for n in gm.graph.nodes if n.op == "output").args[0]["logits"]
    embeds = {n.args[0].target for n in gm.graph.nodes if n.target == torch.ops.aten.embedding.default}
    heads = _config_attr(model, _HEADS, 1)
    return ModelShape(layers=len(ffns), hidden=ffns[0].x.meta["val"].shape[-1], ffn=max(set(widths), key=widths.count),
                      vocab=logits.meta["val"].shape[-1], heads=heads, kv_heads=_config_attr(model, _KV_HEADS, heads),
                      gated=ffns[0].gated, tied_embeddings=bool(embeds & _output_weights(gm, logits)),
                      seq_len=seq_len or _config_attr(model, _SEQ, 2048), name=name)


def context_length(gm, model) -> int | None:
    """The longest sequence the model takes: its config's context attribute, else the rows of its position
    table (an embedding indexed by anything but the token ids), else None (no limit the model states)."""
    from moec.base.graph import get_param

    configured = _config_attr(model, _SEQ, None)
    if configured is not None:
        return configured
    rows = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == torch.ops.aten.embedding.default:
            index = n.args[1]
            while index.op == "call_function" and index.target in (torch.ops.aten.view.default,
                                                                    torch.ops.aten.reshape.default):
                index = index.args[0]
            if index.op != "placeholder" and n.args[0].op == "get_attr":
                rows.append(get_param(gm, n.args[0].target).shape[0])
    return min(rows) if rows else None


def _output_weights(gm, logits) -> set:
    """Parameters the final projection reads (to tell whether it is the embedding)."""
    node = logits
    while node.op == "call_function" and node.target != torch.ops.aten.linear.default:
        node = node.args[0]
    return {node.args[1].target} if node.op == "call_function" else set()
