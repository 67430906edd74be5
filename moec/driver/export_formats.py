"""The MoE checkpoint formats `moec export` writes, as data: which dense families each one extends (its
attention and norms are theirs), what of moec's options it can express, how its config.json is made from
the dense model's configuration and the build's options, and the names of its MoE tensors (the layout of
the Hugging Face Hub checkpoints, which every transformers version loads).

A format expresses a build exactly or not at all: `inexpressible` names the first option it cannot, with
the formats that can.
"""
from dataclasses import dataclass

from moec.base.errors import MoecError
from moec.base.options import Options


@dataclass(frozen=True)
class Format:
    name: str
    dense: tuple  # dense model_types whose attention, norms and embeddings this format has
    moe_block: str  # layer i's MoE block, as a format string of i
    router: str  # the router's weight, under the block
    expert: tuple  # expert e's (gate, up, down) weight names under the block, format strings of e
    shared: str | None  # the shared expert's module under the block (its weights named like a dense MLP's)
    shared_gate: str | None  # the shared expert's sigmoid gate weight [1, D] under the block
    dense_layers: bool  # whether any layers may keep a dense MLP (mlp_only_layers)
    scaled_weights: bool  # whether gate weights may be left unnormalised (norm_topk_prob=False)
    scores: str = "softmax"  # how the format's router scores experts
    first_dense: bool | None = None  # whether the first layers may keep a dense MLP (default: dense_layers)
    selection_bias: str | None = None  # the router's aux-loss-free selection bias [E], under the block


MIXTRAL = Format("mixtral", ("llama", "mistral"), "model.layers.{}.block_sparse_moe", "gate.weight",
                 ("experts.{}.w1.weight", "experts.{}.w3.weight", "experts.{}.w2.weight"), None, None, False, False)
QWEN_EXPERT = ("experts.{}.gate_proj.weight", "experts.{}.up_proj.weight", "experts.{}.down_proj.weight")
QWEN2_MOE = Format("qwen2_moe", ("qwen2",), "model.layers.{}.mlp", "gate.weight", QWEN_EXPERT, "shared_expert",
                   "shared_expert_gate.weight", True, True)
QWEN3_MOE = Format("qwen3_moe", ("qwen3",), "model.layers.{}.mlp", "gate.weight", QWEN_EXPERT, None, None, True,
                   True)
# multi-head latent attention: only a dense DeepSeek-V3 (first_k_dense_replace = every layer) extends to it;
# one group of experts (n_group = topk_group = 1): moec routes without group limits
DEEPSEEK_V3 = Format("deepseek_v3", ("deepseek_v3",), "model.layers.{}.mlp", "gate.weight", QWEN_EXPERT,
                     "shared_experts", None, False, False, scores="sigmoid", first_dense=True,
                     selection_bias="gate.e_score_correction_bias")
FORMATS = {f.name: f for f in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, DEEPSEEK_V3)}

# what no format here writes: (the option, is it set)
NOWHERE = (
    ("--routing expert-choice", lambda o: o.routing == "expert-choice"),
    ("--hash-layers", lambda o: bool(o.hash_layers)),
    ("--pyramid (one expert count for every layer)", lambda o: o.pyramid is not None),
    ("--capacity-factor (the formats drop no tokens)", lambda o: o.capacity_factor > 0),
    ("--force-balance", lambda o: o.force_balance),
    ("--dense (no experts)", lambda o: o.dense),
)
# what only some formats write: (the option, is it set, can this format)
SOME = (
    ("--router sigmoid", lambda o: o.router == "sigmoid", lambda f: f.scores == "sigmoid"),
    ("--router softmax (the default)", lambda o: o.router == "softmax", lambda f: f.scores == "softmax"),
    ("--shared-experts", lambda o: o.shared_experts > 0, lambda f: f.shared is not None),
    ("--first-dense (dense layers before the MoE layers)", lambda o: o.first_dense > 0,
     lambda f: f.dense_layers if f.first_dense is None else f.first_dense),
    ("--moe-every (dense layers between MoE layers)", lambda o: o.moe_every > 1, lambda f: f.dense_layers),
    ("--router-weights scaled", lambda o: o.router_weights == "scaled", lambda f: f.scaled_weights),
)


def choose(name: str) -> Format:
    if name not in FORMATS:
        raise MoecError(f"--format {name}: one of {', '.join(FORMATS)}")
    return FORMATS[name]


def check_expressible(fmt: Format, o: Options, hf_config: dict | None) -> None:
    """A one-line MoecError naming the first thing of the build fmt cannot express, and the formats that can."""
    for option, on in NOWHERE:
        if on(o):
            raise MoecError(f"{option}: no export format expresses it ({', '.join(FORMATS)} cannot)")
    for option, on, can in SOME:
        if on(o) and not can(fmt):
            able = [f.name for f in FORMATS.values() if can(f)]
            raise MoecError(f"{option}: {fmt.name} cannot express it; formats that can: {', '.join(able)}")
    if hf_config is None:
        raise MoecError("the build was not compiled from a Hugging Face model (a checkpoint directory or a "
                        "transformers model file): export maps a transformers model's names and configuration")
    family = hf_config.get("model_type")
    if family not in fmt.dense:
        able = [f.name for f in FORMATS.values() if family in f.dense]
        raise MoecError(f"the build's dense model is {family}, whose attention {fmt.name} does not have "
                        f"({fmt.name} extends {', '.join(fmt.dense)}); "
                        + (f"formats that can: {', '.join(able)}" if able else "no export format extends it"))
    biased = [k for k in ("attention_bias", "mlp_bias") if hf_config.get(k)]
    if fmt is MIXTRAL and biased:
        raise MoecError(f"the dense model's {biased[0]}: mixtral has no biases in attention or experts")


def config(fmt: Format, o: Options, hf_config: dict, widths: dict, dense_layers: list[int], dtype: str) -> dict:
    """The format's config.json fields: the dense model's, with the MoE ones set from the build.
    widths: expert, shared and dense FFN widths (None where absent); dense_layers: layers left dense."""
    own = {"architectures", "model_type", "transformers_version", "_name_or_path", "auto_map", "dtype",
           "torch_dtype", "use_cache"}
    base = {k: v for k, v in hf_config.items() if k not in own}
    experts, topk = o.experts * o.granularity, o.topk * o.granularity
    moe = dict(num_experts_per_tok=topk, router_aux_loss_coef=o.aux_loss, output_router_logits=False)
    if fmt is MIXTRAL:
        moe.update(num_local_experts=experts, intermediate_size=widths["expert"], router_jitter_noise=0.0)
    elif fmt is DEEPSEEK_V3:  # sigmoid scores renormalised: --router-weights scaled is for a softmax router
        moe = dict(num_experts_per_tok=topk, n_routed_experts=experts, moe_intermediate_size=widths["expert"],
                   n_shared_experts=(widths["shared"] or 0) // widths["expert"],
                   first_k_dense_replace=len(dense_layers), n_group=1, topk_group=1, norm_topk_prob=True,
                   routed_scaling_factor=1.0)
    else:
        moe.update(num_experts=experts, moe_intermediate_size=widths["expert"], decoder_sparse_step=1,
                   mlp_only_layers=dense_layers, norm_topk_prob=o.router_weights == "renorm")
        if dense_layers:
            moe["intermediate_size"] = widths["dense"]
    if fmt.shared_gate is not None:
        moe["shared_expert_intermediate_size"] = widths["shared"] or 0
    return {**base, **moe, "model_type": fmt.name, "dtype": dtype, "use_cache": True}
