"""Pipeline parallelism at run time: a build's stages.py, run by torch.distributed.pipelining.

`stage_output` is what every stage's forward returns through: its layers' aux
and z losses join the training loss through autograd (an identity on the
stage's output whose backward gives each loss the gradient 1, as if it were
added to the loss), so nothing but the hidden state travels between stages;
their values and the expert counts are kept per micro-batch for the loop.
`restrict` makes a stage of the full model: the same parameter objects under
the same names, only those the stage runs. `Pipeline` holds this rank's
stages and the schedule, and runs one optimizer step's micro-batches.
"""
import copy

import torch
import torch.distributed as dist

from moec.base.errors import MoecError
from moec.base.options import rank_stages

# --pp-schedule -> torch.distributed.pipelining's class
SCHEDULES = {"1f1b": "Schedule1F1B", "gpipe": "ScheduleGPipe", "interleaved-1f1b": "ScheduleInterleaved1F1B",
             "zero-bubble": "ScheduleInterleavedZeroBubble", "dualpipev": "ScheduleDualPipeV"}

# schedules that run a stage's input and weight gradients as separate backward passes
SPLIT_BACKWARD = {"zero-bubble", "dualpipev"}

_RECORDS: dict = {}  # stage index -> one record per micro-batch: its aux and z losses and expert counts


def clear_records() -> None:
    _RECORDS.clear()


class _AddLoss(torch.autograd.Function):
    """x unchanged; backward gives `loss` the gradient 1, as if it had been added to the training loss."""

    @staticmethod
    def forward(ctx, x, loss):
        ctx.like = loss.detach()
        return x.clone()  # not a view of x: the zero-bubble schedules detach stage outputs in place

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones_like(ctx.like)


def splits_custom_functions() -> bool:
    """Whether this torch's pipelining can split the backward of a custom autograd.Function (every MoE layer
    is one) into input and weight gradients: it reads each node's _input_metadata, which older torch (2.11)
    does not give a custom Function's node."""
    x = torch.zeros(1, requires_grad=True)
    try:
        _AddLoss.apply(x, x.sum()).grad_fn._input_metadata
    except RuntimeError:
        return False
    return True


def stage_output(value: torch.Tensor, stage: int, aux_loss=None, z_loss=None, expert_counts=()) -> torch.Tensor:
    """value, carrying the stage's MoE losses to the loss through autograd; keeps their values and the expert
    counts of this micro-batch when it trains (not those of the shape inference torch runs without grad)."""
    losses = [loss for loss in (aux_loss, z_loss) if loss is not None]
    if not torch.is_grad_enabled():
        return value
    _RECORDS.setdefault(stage, []).append(
        {"aux_loss": aux_loss, "z_loss": z_loss, "expert_counts": [c.detach() for c in expert_counts]})
    return _AddLoss.apply(value, sum(losses)) if losses else value


def restrict(model: torch.nn.Module, reads, layers: tuple, cls=None) -> torch.nn.Module:
    """A copy of model's module tree holding only the parameters and buffers named in reads (a tied weight also
    under its first name), the modules named there (the regions a model runs in an autocast or grad mode of
    their own) and the layers [lo, hi) of layers = (container, lo, hi) (the others replaced by empty modules,
    so names stay), as the same objects; of class cls when given."""
    container, lo, hi = layers
    first = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    # a tied name read keeps the name the model lists the weight under too: one name for it on every stage
    keep = set(reads) | {first[id(p)] for name, p in model.named_parameters(remove_duplicate=False) if name in reads}

    def subtree(module, prefix):
        new = copy.copy(module)
        new._parameters = {n: p for n, p in module._parameters.items() if prefix + n in keep}
        new._buffers = {n: b for n, b in module._buffers.items() if prefix + n in keep}
        new._modules = {}
        for name, child in module._modules.items():
            path = prefix + name
            if path == container:
                stack = copy.copy(child)
                stack._modules = {k: m if lo <= int(k) < hi else torch.nn.Module() for k, m in child._modules.items()}
                new._modules[name] = stack
            elif path in keep:
                new._modules[name] = child
            elif any(k.startswith(path + ".") for k in keep) or container.startswith(path + "."):
                new._modules[name] = subtree(child, path + ".")
        return new

    stage = subtree(model, "")
    if cls is not None:
        stage.__class__ = cls
    return stage


def _union(model, classes) -> torch.nn.Module:
    """model holding what any of the stage classes runs (a rank's share, for the optimizer and checkpoints)."""
    reads = set().union(*(c.READS for c in classes))
    container = classes[0].LAYERS[0]
    layers = set().union(*(range(c.LAYERS[1], c.LAYERS[2]) for c in classes))
    union = restrict(model, reads, (container, 0, 0))
    stack = union.get_submodule(container)
    full = model.get_submodule(container)
    stack._modules = {k: full._modules[k] if int(k) in layers else m for k, m in stack._modules.items()}
    return union


class Pipeline:
    def __init__(self, model: torch.nn.Module, stages, schedule: str, micro_batches: int, group, device, loss_fn):
        """model: the full model (experts and TP slices already sharded); stages: the build's stages module."""
        from torch.distributed import pipelining

        ranks, rank = dist.get_world_size(group), dist.get_rank(group)
        count = len(stages.STAGES)
        if micro_batches < ranks:
            raise MoecError(f"--grad-accum {micro_batches}: a pipeline of {ranks} ranks needs at least {ranks} "
                            f"micro-batches a step (the micro-batches are the gradient-accumulation ones)")
        name = SCHEDULES[schedule]
        if not hasattr(pipelining, name):
            raise MoecError(f"this torch has no {name} (--pp-schedule {schedule}): recompile with another "
                            f"--pp-schedule, or use a newer torch")
        if schedule in SPLIT_BACKWARD and not splits_custom_functions():
            raise MoecError(f"--pp-schedule {schedule}: this torch ({torch.__version__}) cannot split the backward of "
                            f"the MoE layers' autograd functions into input and weight gradients; recompile with "
                            f"--pp-schedule 1f1b or interleaved-1f1b, or use a newer torch")
        self.indices = rank_stages(schedule, rank, ranks)
        classes = [stages.STAGES[i] for i in self.indices]
        self.model = _union(model, classes)
        self.modules = [restrict(model, c.READS, c.LAYERS, c) for c in classes]
        held = [{id(p) for p in m.parameters()} for m in self.modules]
        if schedule in SPLIT_BACKWARD and len(held) > 1 and held[0] & held[1]:
            raise MoecError(f"--pp-schedule {schedule}: two stages on one rank use the same weight (model.py's TIED, "
                            f"on the first and the last stage), whose gradient under this schedule's split backward "
                            f"is not right yet; recompile with --pp-schedule zero-bubble or interleaved-1f1b")
        made = [pipelining.PipelineStage(m, i, count, device, group=group) for m, i in zip(self.modules, self.indices)]
        try:
            self.schedule = getattr(pipelining, name)(made if len(made) > 1 else made[0],
                                                      n_microbatches=micro_batches, loss_fn=loss_fn)
        except ValueError as e:
            raise MoecError(f"--pp-schedule {schedule} with --grad-accum {micro_batches}: {e}") from None
        self.group, self.device, self.experts = group, device, list(stages.EXPERTS)
        self.micro_batches = micro_batches
        self.first, self.last = 0 in self.indices, count - 1 in self.indices
        self.owner = {i: r for r in range(ranks) for i in rank_stages(schedule, r, ranks)}  # stage -> its rank
        self.loss_fn = loss_fn

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple:
        """Forward and backward of one step's micro-batches (inputs split along the batch). (sum of the
        micro-batches' LM losses, one dict per micro-batch with aux_loss, z_loss, expert_counts of all MoE
        layers), the same on every rank of the pipeline."""
        clear_records()
        losses = []
        self.schedule.step(*self._first_inputs(inputs), target=targets if self.last else None,
                           losses=losses if self.last else None)
        return self._gather(losses)

    def check_flags(self, args) -> None:
        """MoecError, before any training, for train.py's flags a pipeline does not carry out."""
        for flag, on in (("--compile", args.compile == "on"), ("--cuda-graphs", args.cuda_graphs),
                         ("--debug-nan-at-step", args.debug_nan_at_step is not None),
                         ("--bias-refit-forward", getattr(args, "bias_refit_forward", False))):  # a build before it
            if on:
                raise MoecError(f"{flag} does not apply to pipeline stages yet: drop it, or recompile without --pp")

    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's LM loss, forward only (call under no_grad), the same on every rank of the pipeline. The batch
        goes through the stages in one piece, each stage's rank passing its output to the next stage's (or
        keeping it where that rank runs the next stage too): torch's schedules have no forward-only pass for
        every placement (DualPipeV's needs a backward), and one piece gives the loss one process gives."""
        loss = torch.zeros((), device=self.device)
        mine, me = dict(zip(self.indices, self.modules)), dist.get_rank(self.group)
        x = inputs
        for i in range(len(self.owner)):
            if self.owner[i] != me:
                continue
            if i > 0 and self.owner[i - 1] != me:
                x = _receive(self.owner[i - 1], self.group, self.device)
            x = mine[i](x)
            if i + 1 < len(self.owner) and self.owner[i + 1] != me:
                _send(x, self.owner[i + 1], self.group)
            elif i + 1 == len(self.owner):
                loss = self.loss_fn(x, targets).float()
        dist.all_reduce(loss, group=self.group)
        return loss

    def _first_inputs(self, inputs: torch.Tensor) -> tuple:
        # a batch is a view of longer rows; torch 2.11's stages refuse inputs whose strides differ from the
        # contiguous example the stage was built with
        return (inputs.contiguous(),) if self.first else ()

    def _gather(self, losses: list) -> tuple:
        micro = self.micro_batches
        flat = torch.zeros(micro, 3 + sum(self.experts), dtype=torch.float64, device=self.device)
        if losses:
            flat[:, 0] = torch.stack([loss.detach() for loss in losses]).to(flat)
        offsets = [3 + sum(self.experts[:i]) for i in range(len(self.experts))]
        for i, module in zip(self.indices, self.modules):
            first_moe = module.MOE_LAYERS[0]
            for m, record in enumerate(_RECORDS.get(i, [])[-micro:]):  # the first step's shape inference ran one more
                for col, key in ((1, "aux_loss"), (2, "z_loss")):
                    if record[key] is not None:
                        flat[m, col] += record[key].detach().to(flat)
                for j, counts in enumerate(record["expert_counts"]):
                    at = offsets[first_moe + j]
                    flat[m, at:at + counts.numel()] += counts.to(flat)
        dist.all_reduce(flat, group=self.group)
        outs = [{"aux_loss": row[1], "z_loss": row[2], "expert_counts": list(row[3:].split(self.experts))}
                if self.experts else {} for row in flat]  # a dense build's forward returns only logits
        return flat[:, 0].sum(), outs


# dtypes a stage may pass on, by code: the header before the tensor tells the receiver its shape and dtype
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _send(x: torch.Tensor, to: int, group) -> None:
    header = torch.tensor([_DTYPES.index(x.dtype), x.dim(), *x.shape], dtype=torch.int64)
    dist.send(torch.nn.functional.pad(header, (0, 8 - len(header))).to(x.device), group_dst=to, group=group)
    dist.send(x.contiguous(), group_dst=to, group=group)


def _receive(source: int, group, device) -> torch.Tensor:
    header = torch.empty(8, dtype=torch.int64, device=device)
    dist.recv(header, group_src=source, group=group)
    code, dims, *shape = header.tolist()
    x = torch.empty(shape[:dims], dtype=_DTYPES[code], device=device)
    dist.recv(x, group_src=source, group=group)
    return x
