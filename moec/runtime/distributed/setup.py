"""setup(): what a training loop calls once to run a build expert-parallel."""
import torch
import torch.distributed as dist

from moec.runtime.distributed import groups
from moec.runtime.distributed.mesh import build_mesh
from moec.runtime.distributed.params import GradSync, shard_experts


def setup(model: torch.nn.Module, options):
    """model (holding all experts, weights loaded) -> (model holding this rank's experts,
    DeviceMesh or None, grad_sync). Call after dist.init_process_group; call grad_sync()
    after each backward instead of wrapping the model in DDP."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        groups.clear()
        return model, None, GradSync(model)
    node_size = options.node_size if options.ep_variant != "flat" else 0
    mesh = build_mesh(options.ep, node_size, options.pp)
    if options.ep > 1:
        shard_experts(model, options.ep, mesh.get_local_rank("ep"))
    return model, mesh, GradSync(model)
