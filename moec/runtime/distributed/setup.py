"""setup(): what a training loop calls once to run a build expert-parallel."""
import torch
import torch.distributed as dist

from moec.runtime.distributed import groups
from moec.runtime.distributed.mesh import build_mesh
from moec.runtime.distributed.params import GradSync, shard_experts


def ep_options(config: dict) -> dict:
    """The build's EP options (config.json's "ep"; EP 1 when absent)."""
    return {"ep": 1, "node_size": 0, **(config.get("ep") or {})}


def setup(model: torch.nn.Module, config: dict):
    """model (holding all experts, weights loaded) -> (model holding this rank's experts,
    DeviceMesh or None, grad_sync). Call after dist.init_process_group; call grad_sync()
    after each backward instead of wrapping the model in DDP."""
    opts = ep_options(config)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        groups.clear()
        return model, None, GradSync(model)
    mesh = build_mesh(opts["ep"], opts["node_size"])
    if opts["ep"] > 1:
        shard_experts(model, opts["ep"], mesh.get_local_rank("ep"))
    return model, mesh, GradSync(model)
