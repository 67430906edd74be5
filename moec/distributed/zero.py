"""ZeRO-1 optimizer-state sharding with torch's ZeroRedundancyOptimizer.

Replicated parameters and experts live in different data-parallel groups, so
there are two: the replicated parameters' state is sharded over "data" (all
ranks), each expert slice's state over "ep_dp" (the ranks holding the same
experts). Gradients are still reduced whole by grad_sync (ZeRO-1, not -2):
each rank then updates its shard and ZeroRedundancyOptimizer broadcasts the
result. On one process it is the optimizer itself.
"""
import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from moec.distributed import groups
from moec.distributed.params import is_expert


class ShardedOptimizer:
    """step() / zero_grad() over the two ZeroRedundancyOptimizers."""

    def __init__(self, parts: list):
        self.parts = parts

    def step(self) -> None:
        for p in self.parts:
            p.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parts:
            p.zero_grad(set_to_none=set_to_none)


def make_optimizer(model: torch.nn.Module, optimizer_class=torch.optim.AdamW, **defaults):
    """optimizer_class over model's trainable parameters, its state sharded ZeRO-1 style under torchrun."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return optimizer_class([p for _, p in params], **defaults)
    parts = []
    for expert, group in ((False, groups.get("data")), (True, groups.get("ep_dp"))):
        mine = [p for n, p in params if is_expert(n) == expert]
        if mine:
            parts.append(ZeroRedundancyOptimizer(mine, optimizer_class, process_group=group, **defaults))
    return ShardedOptimizer(parts)
