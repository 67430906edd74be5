"""How train.py runs its build's parallel plan: `parallelize` applies the plan
(config.json's options) to the model and returns the `Parallel` the loop
drives (its optimizer, gradient accumulation and clipping)."""
import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moec.base.errors import MoecError
from moec.runtime.distributed import groups
from moec.runtime.kernels.generated import import_file
from moec.runtime.ops import weight_copies
from moec.runtime.training.loop import Env


def wrap(model: torch.nn.Module, env: Env, fsdp: bool = False) -> torch.nn.Module:
    """DDP (or FSDP2) when there is more than one process; the model itself otherwise."""
    if env.world == 1:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        # One unit for the whole model (units per layer, now that each layer is a module of
        # model.py, are not made yet), on a mesh of the device this process trains on.
        return fully_shard(model, mesh=init_device_mesh(env.device.type, (env.world,)))
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)


class Parallel:
    """How a training loop drives the model it got from parallelize()."""

    def __init__(self, model, env: Env, mesh=None, grad_sync=None, zero: bool = False, pipeline=None,
                 fsdp: bool = False):
        self.model, self.mesh, self.grad_sync, self.zero, self.pipeline = model, mesh, grad_sync, zero, pipeline
        self.fsdp = fsdp and env.world > 1
        # which share of the data this rank reads: the stages of a pipeline, and the ranks of a TP group, read the same
        data = groups.get("data") if mesh is not None else None
        self.data_rank = env.rank if data is None else dist.get_rank(data)
        self.data_world = env.world if data is None else dist.get_world_size(data)

    @property
    def expert_parallel(self) -> bool:
        """Whether ranks hold different parameters (experts, pipeline stages, TP slices): no one rank has the
        model."""
        return self.mesh is not None

    def optimizer(self, optimizer_class, param_groups: list, **defaults) -> torch.optim.Optimizer:
        """optimizer_class over param_groups; with zero, its state sharded over the data-parallel ranks
        (ZeRO-1: replicated parameters' over the "data" group, all ranks without PP and TP, else those of the
        same stage and TP index; experts' over the ranks holding the same experts). Under PP the parameters are
        those of this rank's stages; a tied weight that the first and last stage both hold gets the same summed
        gradient on both (GradSync), and each stage's owner of its state updates it alike and broadcasts it over
        its own data group, so the copies stay equal as they do unsharded."""
        if self.zero:
            from moec.runtime.distributed.zero import make_optimizer
            optimizer = make_optimizer(self.model, optimizer_class, param_groups, **defaults)
        else:
            optimizer = optimizer_class(param_groups, **defaults)
        if not self.fsdp:  # the experts' bf16 copies last from one optimizer step to the next
            weight_copies.keep_until_step(optimizer)
        return optimizer

    def accumulating(self, more_to_come: bool):
        """Context of one micro-batch's backward: DDP skips its gradient all-reduce while more
        micro-batches of the step follow (the last one reduces the sum)."""
        if more_to_come and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Synchronise gradients where DDP/FSDP do not (expert parallel), then clip by the global norm."""
        if self.grad_sync is None:
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.grad_sync()
        return self.grad_sync.clip_grad_norm_(max_norm)


def check_world(options, world: int) -> None:
    """The processes torchrun started can carry out the build's plan: a multiple of EP x PP x TP, and exactly
    the plan's count when the planner fixed its data parallelism. One process runs any plan's arithmetic."""
    grid = options.ep * options.pp * options.tp
    label = f"EP{options.ep} PP{options.pp} TP{options.tp}"
    if world == 1 or (world % grid == 0 and (not options.dp or world == grid * options.dp)):
        return
    if options.dp:
        raise MoecError(f"this build's plan ({label} DP{options.dp}) runs on {grid * options.dp} processes, not "
                        f"{world}: start torchrun with {grid * options.dp} in all, or recompile with "
                        f"--ep/--pp/--tp for {world}")
    raise MoecError(f"this build's plan ({label}) needs a multiple of {grid} processes, not {world}: start "
                    f"torchrun with {grid * max(world // grid, 1)}, or recompile with --ep/--pp/--tp that divide {world}")


def parallelize(model: torch.nn.Module, env: Env, options, fsdp: bool = False, zero: bool = False,
                micro_batches: int = 1, loss_fn=None, tp_plan: dict | None = None) -> Parallel:
    """Apply the build's parallel plan (its Options), in one place and this order: check the world against it;
    build the (pp, dp, ep, tp) mesh; experts over the EP ranks (ep > 1 under torchrun, gradients reduced by
    moec.runtime.distributed); attention, dense FFNs and shared experts over the TP ranks (tp > 1: the
    compiler's tp_plan, config.json's, says which weights split how; the router and the routed experts are
    the same on every rank of a TP group); this rank's pipeline stages of stages.py (pp > 1: micro_batches a
    step, the last stage's loss_fn(logits, targets); with tp > 1 each stage's linears split over its TP group,
    TP rank t of one stage sending to TP rank t of the next); or else DDP / FSDP2 (ZeRO-3: the plan's --zero 3
    or train.py's --fsdp, on a data-parallel build only); then ZeRO-1 for the optimizer (the plan's --zero 1
    or train.py's --zero; with TP, a slice's state sharded over the ranks holding the same slice; with PP, a
    stage's state over the ranks running the same stage, the ones holding the same TP slice)."""
    check_world(options, env.world)
    fsdp, zero = fsdp or options.zero == 3, zero or options.zero == 1
    if fsdp and zero:
        raise MoecError("--zero shards the optimizer state, which --fsdp (FSDP2) already shards along with the "
                        "parameters and gradients: use one of them")
    from moec.runtime.distributed.setup import setup

    ep, pp, tp = options.ep, options.pp, options.tp
    for kind, degree, on, why, too in (
            ("pipeline", f"PP={pp}", pp > 1, "each stage holds only its layers already", ""),
            ("tensor", f"TP={tp}", tp > 1 and env.world > 1, "its linears are split over the ranks already", ""),
            ("expert", f"EP={ep}", ep > 1, "its experts are sharded over the ranks already", " too")):
        if fsdp and on:
            raise MoecError(f"--fsdp shards a data-parallel build, and this build is {kind} parallel ({degree}): "
                            f"{why}; use --zero to shard the optimizer state{too}")
    if env.world > 1 and pp > 1:
        from moec.runtime.training.pipeline import Pipeline

        model, mesh, grad_sync = setup(model, options, tp_plan)
        pipeline = Pipeline(model, _stages(model), options.pp_schedule, micro_batches, groups.get("pp"),
                            env.device, loss_fn)
        grad_sync = grad_sync.over(pipeline.model, _shared(pipeline.model, model))
        return Parallel(pipeline.model, env, mesh, grad_sync, zero, pipeline=pipeline)
    if env.world > 1 and (ep > 1 or tp > 1):
        model, mesh, grad_sync = setup(model, options, tp_plan)
        return Parallel(model, env, mesh, grad_sync, zero)
    return Parallel(wrap(model, env, fsdp), env, zero=zero, fsdp=fsdp)


def _stages(model: torch.nn.Module):
    """The build's stages.py, beside the model.py that model comes from."""
    path = Path(sys.modules[type(model).__module__].__file__).with_name("stages.py")
    if not path.is_file():
        raise MoecError(f"{path.parent} has no stages.py: recompile the build with this moec")
    return import_file(f"moec_stages_{id(model)}", path)


def _shared(share: torch.nn.Module, full: torch.nn.Module) -> dict:
    """{name: (shape, dtype, counted)} of the parameters that more than one rank of this pipeline holds (a tied
    embedding on the first and last stages); counted on the first rank holding it."""
    mine = [n for n, _ in share.named_parameters()]
    held = [None] * dist.get_world_size(groups.get("pp"))
    dist.all_gather_object(held, mine, group=groups.get("pp"))
    me, params = dist.get_rank(groups.get("pp")), dict(full.named_parameters())
    shared = {}
    for name in sorted(set().union(*held)):
        holders = [r for r, names in enumerate(held) if name in names]
        if len(holders) > 1:
            shared[name] = (tuple(params[name].shape), params[name].dtype, holders[0] == me)
    return shared
