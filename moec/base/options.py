"""Options: everything a user chooses about a build, in one record.

The CLI fills it, `validate` checks it once (each mistake one line), the
passes and the planner read it, `moec compile` writes it to config.json
("options") and the training program reads it back through `from_json`. No
other copy of these choices exists. Checks that need the model (the FFN width
a granularity must divide, the expert count an EP size must divide) are made
by the passes that meet the model. Imports no torch: the cost model uses it.
"""
from dataclasses import asdict, dataclass, field, fields, replace

from moec.base.errors import MoecError

ROUTERS = ("softmax", "sigmoid")
ROUTER_INITS = ("random", "centered", "kmeans")
ROUTER_WEIGHTS = ("renorm", "scaled")
AUX_LOSS_SCOPES = ("batch", "sequence")
ROUTINGS = ("topk", "expert-choice")
EP_VARIANTS = ("flat", "hierarchical", "rbd")
# torch.distributed.pipelining's schedules by the names --pp-schedule takes
PP_SCHEDULES = ("1f1b", "gpipe", "interleaved-1f1b", "zero-bubble", "dualpipev")
# those that run two stages a rank, and how they place them: rank r of p runs r and r + p ("loop"), or r and
# 2p - 1 - r ("v": the first and the last stage on rank 0, so the V turns on the last rank)
TWO_STAGES = {"interleaved-1f1b": "loop", "zero-bubble": "loop", "dualpipev": "v"}


def stages_per_rank(schedule: str) -> int:
    return 2 if schedule in TWO_STAGES else 1


def rank_stages(schedule: str, rank: int, ranks: int) -> list[int]:
    """The pipeline stages rank `rank` of `ranks` runs under `schedule`."""
    if schedule not in TWO_STAGES:
        return [rank]
    return [rank, rank + ranks if TWO_STAGES[schedule] == "loop" else 2 * ranks - 1 - rank]
# what a planner's plan (plan.json's "chosen") sets
PLAN_FIELDS = ("ep", "dp", "tp", "pp", "zero", "recompute", "micro_batch", "micro_batches")


@dataclass(frozen=True)
class Options:
    # the model file and its factory
    entry: str = "build_model"
    config: str | None = None
    overrides: dict = field(default_factory=dict)
    weights: str | None = None  # dense weights to upcycle
    seed: int = 0
    dense: bool = False  # keep the model dense (a baseline)
    # MoE layers
    experts: int = 8
    topk: int = 2
    router: str = "softmax"
    routing: str = "topk"  # or "expert-choice": each expert takes its top tokens of the batch
    hash_layers: tuple = ()  # MoE layers (0-based, in order) routed by a fixed token-id table (Hash Layers)
    router_init: str = "centered"  # how router rows start: see passes/routers.py
    calibration_data: str | None = None  # text or .bin whose FFN inputs data-aware router inits read
    shared_experts: int = 0
    granularity: int = 1
    moe_every: int = 1
    first_dense: int = 0
    pyramid: tuple | None = None  # (experts, last MoE layers that get them)
    upcycle_noise: float = 0.0
    capacity_factor: float = 0.0  # 0: dropless
    router_weights: str = "renorm"  # top-k scores over their sum, or all-expert softmax scores times E/K
    drop_upcycle: float = 0.0  # share of each expert's FFN units re-initialised (Drop-Upcycling)
    aux_loss: float = 0.01
    aux_loss_scope: str = "batch"  # "sequence": the balance loss per sequence, averaged
    z_loss: float = 0.001
    expert_bias_rate: float = 1e-3  # > 0: aux-loss-free balancing, the selection bias's step a training step
    force_balance: bool = False  # benchmarking aid: tokens dealt to experts round-robin, whatever the router says
    recompute_experts: bool = False
    expert_ffn: int | None = None  # expert width when not ffn / granularity (models trained as MoEs; planning)
    max_nodes_per_token: int = 0  # node-limited routing, for planning (0: no limit)
    # the parallel plan, one record: given as --ep/--pp/--tp/--zero/--recompute, read from --plan plan.json, or
    # chosen by the planner for --gpus on --hardware; train.py applies it in one place (runtime parallelize)
    ep: int = 1
    pp: int = 1  # pipeline stages
    pp_schedule: str = "1f1b"  # one of PP_SCHEDULES
    tp: int = 1  # tensor-parallel degree
    sequence_parallel: bool = False  # with tp > 1: outside attention/FFN each TP rank holds 1/TP of the tokens
    dp: int = 0  # data-parallel replicas of the EP x PP x TP grid; 0: as many as the world holds (a plan fixes it)
    recompute: bool = False  # recompute every layer's activations in backward
    # the micro-batch the plan was costed for: train.py's default --batch-size and --grad-accum (0: its own)
    micro_batch: int = 0  # sequences per rank per micro-batch
    micro_batches: int = 0  # micro-batches per optimizer step (a pipeline's: at least its stages)
    ep_variant: str = "flat"
    node_size: int = 0  # ranks per node, for the hierarchical and rbd variants
    ep_chunks: int = 1  # > 1: overlap one chunk of experts' all-to-all with another's compute
    zero: int = 0  # ZeRO stage: 0, 1 (optimizer state sharded over the data-parallel ranks) or 3 (FSDP2)
    gpus: int = 0  # > 0: the planner chooses the plan for this many GPUs
    hardware: str | None = None  # profile for --gpus (default dgx_h100)
    # how the compiler works
    triton: bool = True  # lower routing to generated Triton kernels
    verify: bool = True
    max_weights_gb: float = 4.0
    reference_weights: bool = False  # the build names the dense checkpoint's files (and their SHA-256), not copies

    def validate(self) -> "Options":
        """self, or a MoecError naming the first option that is wrong and how to fix it."""
        for problem in self._problems():
            raise MoecError(problem)
        return self

    def _problems(self):
        if self.experts < 1:
            yield f"--experts must be at least 1 (got {self.experts})"
        if self.topk < 1:
            yield f"--topk must be at least 1 (got {self.topk})"
        for e in [self.experts] + ([self.pyramid[0]] if self.pyramid else []):
            if self.topk > e:
                yield f"--topk {self.topk} is more than the {e} experts a layer has; lower --topk or add experts"
        if self.router not in ROUTERS:
            yield f"--router must be one of {', '.join(ROUTERS)} (got {self.router})"
        if self.router_init not in ROUTER_INITS:
            yield f"--router-init must be one of {', '.join(ROUTER_INITS)} (got {self.router_init})"
        if self.routing not in ROUTINGS:
            yield f"--routing must be one of {', '.join(ROUTINGS)} (got {self.routing})"
        if any(i < 0 for i in self.hash_layers) or len(set(self.hash_layers)) != len(self.hash_layers):
            yield f"--hash-layers {','.join(map(str, self.hash_layers))}: distinct MoE layer numbers from 0"
        special = [flag for flag, on in (("--routing expert-choice", self.routing == "expert-choice"),
                                         ("--hash-layers", bool(self.hash_layers))) if on]
        for other, on in (("--ep", self.ep > 1 or self.gpus > 0), ("--force-balance", self.force_balance),
                          ("--router-weights scaled", self.router_weights == "scaled")):
            if special and on:
                yield f"{special[0]} does not combine with {other} (it chooses experts its own way)"
        if self.routing == "expert-choice" and self.aux_loss_scope == "sequence":
            yield "--aux-loss-scope sequence balances top-k routing; expert-choice routing is balanced by construction"
        if self.router_weights not in ROUTER_WEIGHTS:
            yield f"--router-weights must be one of {', '.join(ROUTER_WEIGHTS)} (got {self.router_weights})"
        if self.router_weights == "scaled" and self.router != "softmax":
            yield "--router-weights scaled keeps the dense output under a uniform softmax router: use --router softmax"
        if self.aux_loss_scope not in AUX_LOSS_SCOPES:
            yield f"--aux-loss-scope must be one of {', '.join(AUX_LOSS_SCOPES)} (got {self.aux_loss_scope})"
        if not 0 <= self.drop_upcycle <= 1:
            yield f"--drop-upcycle is a share of each expert's units, from 0 to 1 (got {self.drop_upcycle})"
        if self.expert_bias_rate < 0:
            yield f"--expert-bias-rate must be >= 0 (got {self.expert_bias_rate})"
        if self.granularity < 1:
            yield f"--granularity must be at least 1 (got {self.granularity})"
        if not 0 <= self.shared_experts < self.experts * self.granularity:
            yield (f"--shared-experts {self.shared_experts} must be at least 0 and less than the "
                   f"{self.experts * self.granularity} routed experts")
        if self.moe_every < 1 or self.first_dense < 0:
            yield "--moe-every must be >= 1 and --first-dense >= 0"
        if self.pyramid is not None and (len(self.pyramid) != 2 or min(self.pyramid) < 1):
            yield f"--pyramid {self.pyramid}: expected EXPERTS:LAYERS, both at least 1"
        if self.capacity_factor < 0 or self.upcycle_noise < 0:
            yield "--capacity-factor and --upcycle-noise must be >= 0"
        if self.max_weights_gb < 0:
            yield f"--max-weights-gb must be >= 0 (got {self.max_weights_gb})"
        yield from self._parallel_problems()

    def _parallel_problems(self):
        if self.ep < 1 or self.gpus < 0:
            yield f"--ep must be at least 1 and --gpus at least 0 (got {self.ep}, {self.gpus})"
        if self.ep_variant not in EP_VARIANTS:
            yield f"--ep-variant {self.ep_variant!r}: use one of {', '.join(EP_VARIANTS)}"
        if self.ep == 1 and not self.gpus:
            lone = [flag for flag, given in (("--ep-variant", self.ep_variant != "flat"),
                                             ("--node-size", self.node_size != 0),
                                             ("--ep-chunks", self.ep_chunks != 1)) if given]
            if lone:
                verb = "means" if len(lone) == 1 else "mean"
                yield f"{', '.join(lone)} {verb} something only with expert parallelism: add --ep N (N > 1)"
        elif self.ep_variant != "flat" and not (1 < self.node_size < self.ep and self.ep % self.node_size == 0):
            yield (f"--ep-variant {self.ep_variant} needs --node-size G with 1 < G < EP={self.ep} dividing it "
                   f"(got {self.node_size})")
        if self.ep_chunks < 1 or (self.ep_chunks > 1 and self.ep_variant != "flat"):
            yield f"--ep-chunks {self.ep_chunks}: use 1, or more with the flat variant"
        if self.hardware is not None and not self.gpus:
            yield "--hardware only means something with --gpus N (the planner's target)"
        if self.dense and (self.ep > 1 or self.gpus):
            yield "--dense builds have no experts to shard: drop --ep / --gpus"
        if min(self.pp, self.tp, self.dp + 1) < 1 or self.zero not in (0, 1, 2, 3):
            yield f"--pp and --tp must be at least 1 and --zero one of 0-3 (got {self.pp}, {self.tp}, {self.zero})"
        if self.pp_schedule not in PP_SCHEDULES:
            yield f"--pp-schedule {self.pp_schedule!r}: use one of {', '.join(PP_SCHEDULES)}"
        if self.gpus and not self.dp:  # the planner has yet to choose: a plan given as well would be overwritten
            given = [flag for flag, on in (("--ep", self.ep > 1), ("--pp", self.pp > 1), ("--tp", self.tp > 1),
                                           ("--zero", self.zero > 0), ("--recompute", self.recompute)) if on]
            if given:
                yield f"give {', '.join(given)} or --gpus N, not both: with --gpus the planner chooses the plan"
        if self.gpus and self.dp and self.ep * self.dp * self.tp * self.pp != self.gpus:
            yield (f"the plan EP{self.ep} DP{self.dp} TP{self.tp} PP{self.pp} does not multiply to its "
                   f"{self.gpus} GPUs; plan again with --gpus")
        yield from self.runtime_problems()

    def runtime_problems(self):
        """What the training program cannot carry out of this plan, each a line naming the option and what
        it runs instead. The compiler refuses such a plan and the planner's --gpus search skips it."""
        if self.tp > 1:
            yield from self._tp_problems()
        elif self.sequence_parallel and not (self.gpus and not self.dp):
            yield "--sequence-parallel splits the tokens over the tensor-parallel ranks: add --tp N (N > 1)"
        if self.pp_schedule != "1f1b" and self.pp == 1:
            yield f"--pp-schedule {self.pp_schedule} means something only with pipeline parallelism: add --pp N"
        if self.zero == 2:
            yield "--zero 2: the training program runs ZeRO-1 (optimizer state) or ZeRO-3 (FSDP2), not 2"
        if self.zero == 3 and (self.ep > 1 or self.pp > 1 or self.tp > 1):
            yield (f"--zero 3 (FSDP2) shards a data-parallel build, and this plan is {self.parallel_label()}: "
                   f"use --zero 1 to shard the optimizer state")

    def planner_problems(self):
        """runtime_problems, and plans the cost model predicts otherwise than the training program runs them:
        what the planner's --gpus search skips."""
        yield from self.runtime_problems()

    def _tp_problems(self):
        if not self.dense and self.ep < self.tp:
            yield (f"--tp {self.tp} with --ep {self.ep}: routed experts are not split by TP but sharded by expert "
                   f"parallelism, which must be at least TP (as torchtitan requires); use --ep {self.tp} or more")
        for flag, on in ((f"--ep-variant {self.ep_variant}", self.ep_variant != "flat"),
                         (f"--ep-chunks {self.ep_chunks}", self.ep_chunks > 1)):
            if on:
                yield (f"--tp {self.tp} with {flag}: the training program does not combine them yet; "
                       f"drop {flag.split()[0]}")
        if self.sequence_parallel and self.pp > 1:
            yield f"--sequence-parallel with --pp {self.pp}: the training program does not combine them yet; drop one"
        if self.sequence_parallel and self.aux_loss_scope == "sequence":
            yield ("--sequence-parallel with --aux-loss-scope sequence: the balance loss of each sequence needs it "
                   "whole, which sequence parallelism splits over the TP ranks; use --aux-loss-scope batch")

    def parallel_label(self) -> str:
        return f"EP{self.ep} DP{self.dp or '*'} TP{self.tp} PP{self.pp} ZeRO-{self.zero}"

    def is_moe_layer(self, i: int) -> bool:
        """Whether FFN i becomes an MoE layer: every moe_every-th FFN after the first first_dense."""
        return i >= self.first_dense and (i - self.first_dense) % self.moe_every == 0

    def moe_layer_indices(self, n_ffn: int) -> list[int]:
        return [i for i in range(n_ffn) if self.is_moe_layer(i)]

    def check_ffn_width(self, width: int) -> None:
        if width % self.granularity:
            raise MoecError(f"--granularity {self.granularity} does not divide the FFN width {width}; "
                            f"pick a divisor of {width}")

    @property
    def routed_topk(self) -> int:
        """Slots per token after the fine-grained split."""
        return self.topk * self.granularity

    def with_plan(self, chosen) -> "Options":
        """These options with a planner's plan (a moec.cost_model.Plan, or plan.json's "chosen" record)."""
        get = chosen.get if isinstance(chosen, dict) else lambda k, default: getattr(chosen, k, default)
        return replace(self, **{k: get(k, getattr(self, k)) for k in PLAN_FIELDS})

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Options":
        """The options config.json holds; names this moec does not know are an error, not dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MoecError(f"config.json has options this moec does not know: {', '.join(unknown)}; "
                            f"recompile the build with this moec")
        data = dict(data)
        if data.get("pyramid") is not None:
            data["pyramid"] = tuple(data["pyramid"])
        data["hash_layers"] = tuple(data.get("hash_layers", ()))
        data.setdefault("expert_bias_rate", 0.0)  # a build from before the option has no biases to move
        return cls(**data).validate()
