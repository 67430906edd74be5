"""setup(): what a training loop calls once to run a build expert-parallel."""
import torch
import torch.distributed as dist

from moec.base.errors import MoecError
from moec.runtime.distributed import groups
from moec.runtime.distributed.mesh import build_mesh
from moec.runtime.distributed.params import GradSync
from moec.runtime.distributed.tensor_parallel import shard_linears


def local_experts(options, world: int, rank: int) -> tuple[int, int]:
    """(EP size, this rank's EP index) that moec.runtime.load_build makes this rank's experts for: the mesh
    puts tp fastest, then ep (rank = ((p * DP + d) * EP + j) * TP + t); one process holds every expert."""
    ep = options.ep if world > 1 else 1
    return ep, (rank // options.tp) % ep


def setup(model: torch.nn.Module, options, tp_plan: dict | None = None):
    """model (holding this rank's experts, moec.runtime.load_build(..., *local_experts(...))) -> (model
    holding slices of the linears tp_plan splits, DeviceMesh or None, grad_sync). Call after
    dist.init_process_group; call grad_sync() after each backward instead of wrapping the model in DDP.
    tp_plan: config.json's, {weight: how it is split} (needed when options.tp > 1)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        groups.clear()
        return model, None, GradSync(model)
    node_size = options.node_size if options.ep_variant != "flat" else 0
    mesh = build_mesh(options.ep, node_size, options.pp, options.tp)
    split, partial = [], []
    if options.tp > 1:
        if not tp_plan:
            raise MoecError(f"this build's plan is TP={options.tp} but its config.json has no tp_plan: recompile "
                            f"the build with this moec")
        split = shard_linears(model, tp_plan, options.tp, mesh.get_local_rank("tp"))
        partial = [w for w, how in tp_plan.items() if how["style"] == "sequence"]
    return model, mesh, GradSync(model, tp_split=split, tp_partial=partial)
