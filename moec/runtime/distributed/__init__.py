"""Expert (and tensor) parallelism at run time: the collectives the graph calls,
the mesh and its named groups, expert sharding, the slices of tensor
parallelism (tensor_parallel), gradient sync, ZeRO-1 and resharding
checkpoints.

What a training loop does with an EP build (`moec compile --ep N`):

    dist.init_process_group("nccl" or "gloo")            # under torchrun
    options = Options.from_json(config.json's "options")
    model = moec.runtime.load_build(Model, BUILD, device, *local_experts(options, world, rank))  # E/EP experts
    model, mesh, grad_sync = moec.runtime.distributed.setup(model, options)
    optimizer = moec.runtime.distributed.zero.make_optimizer(model, torch.optim.AdamW, lr=...)  # or any optimizer
    for each step: loss = mean over this rank's tokens; loss.backward(); grad_sync(); optimizer.step()
    moec.runtime.distributed.checkpoint.save(path, model, optimizer, mesh) / .load(...)  # any EP on resume

No DDP or FSDP wrapper: grad_sync does the reductions (experts over their
expert-data-parallel group, the rest over all ranks). On one process setup
returns the model as it is and grad_sync does nothing.
"""
from moec.runtime.distributed import ops, overlap, rbd  # noqa: F401  registers the EP ops (dispatch, combine, ...)
from moec.runtime.distributed.setup import local_experts, setup  # noqa: F401
