"""setup(): what a training loop calls once to run a build expert-parallel."""
import torch
import torch.distributed as dist

from moec.runtime.distributed import groups
from moec.runtime.distributed.mesh import build_mesh
from moec.runtime.distributed.params import GradSync


def local_experts(options, world: int, rank: int) -> tuple[int, int]:
    """(EP size, this rank's EP index) that moec.runtime.load_build makes this rank's experts for: the mesh
    puts ep fastest (rank = (p * DP + d) * EP + j); one process holds every expert."""
    ep = options.ep if world > 1 else 1
    return ep, rank % ep


def setup(model: torch.nn.Module, options):
    """model (holding this rank's experts, moec.runtime.load_build(..., *local_experts(...))) -> (model,
    DeviceMesh or None, grad_sync). Call after dist.init_process_group; call grad_sync()
    after each backward instead of wrapping the model in DDP."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        groups.clear()
        return model, None, GradSync(model)
    node_size = options.node_size if options.ep_variant != "flat" else 0
    mesh = build_mesh(options.ep, node_size, options.pp)
    return model, mesh, GradSync(model)
