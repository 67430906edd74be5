"""How train.py runs its build's parallel plan: `parallelize` applies the plan
(config.json's options) to the model and returns the `Parallel` the loop
drives (its optimizer, gradient accumulation and clipping)."""
import contextlib

import torch

from moec.base.errors import MoecError
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

    def __init__(self, model, mesh=None, grad_sync=None, zero: bool = False):
        self.model, self.mesh, self.grad_sync, self.zero = model, mesh, grad_sync, zero

    @property
    def expert_parallel(self) -> bool:
        return self.mesh is not None

    def optimizer(self, optimizer_class, param_groups: list, **defaults) -> torch.optim.Optimizer:
        """optimizer_class over param_groups; with zero, its state sharded over the data-parallel ranks
        (ZeRO-1: replicated parameters' over all ranks, experts' over the ranks holding the same experts)."""
        if self.zero:
            from moec.runtime.distributed.zero import make_optimizer
            return make_optimizer(self.model, optimizer_class, param_groups, **defaults)
        return optimizer_class(param_groups, **defaults)

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


def parallelize(model: torch.nn.Module, env: Env, options, fsdp: bool = False, zero: bool = False) -> Parallel:
    """Apply the build's parallel plan (its Options), in one place and this order: check the world against it,
    then experts over the EP ranks (ep > 1 under torchrun, gradients reduced by moec.runtime.distributed) or
    DDP / FSDP2 (ZeRO-3: the plan's --zero 3 or train.py's --fsdp), and ZeRO-1 for the optimizer (the plan's
    --zero 1 or train.py's --zero)."""
    check_world(options, env.world)
    fsdp, zero = fsdp or options.zero == 3, zero or options.zero == 1
    if fsdp and zero:
        raise MoecError("--zero shards the optimizer state, which --fsdp (FSDP2) already shards along with the "
                        "parameters and gradients: use one of them")
    from moec.runtime.distributed.setup import setup

    ep = options.ep
    if fsdp and ep > 1:
        raise MoecError(f"--fsdp shards a data-parallel build, and this build is expert parallel (EP={ep}): its "
                        f"experts are sharded over the ranks already; use --zero to shard the optimizer state too")
    if env.world > 1 and ep > 1:
        model, mesh, grad_sync = setup(model, options)
        return Parallel(model, mesh, grad_sync, zero)
    return Parallel(wrap(model, env, fsdp), zero=zero)
