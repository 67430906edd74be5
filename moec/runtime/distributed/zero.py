"""ZeRO-1 optimizer-state sharding with torch's ZeroRedundancyOptimizer.

Replicated parameters and experts live in different data-parallel groups, so
there are two: the replicated parameters' state is sharded over "data" (all
ranks; with tensor parallelism the ranks of the same TP index, which hold the
same slices of the split linears; with pipeline parallelism the ranks running
the same stage, which hold the same layers), each expert slice's state over
"ep_dp" (the ranks holding the same experts, of the same stage). Gradients are still reduced whole by DDP or grad_sync (ZeRO-1, not
-2): each rank then updates its shard and ZeroRedundancyOptimizer broadcasts
the result. On one process it is the optimizer itself.
"""
import torch
import torch.distributed as dist

from moec.runtime.distributed import groups
from moec.runtime.distributed.params import is_expert

NOT_ONE_STATE_DICT = ("a ZeRO-1 optimizer's state is sharded over ranks: save and load it with "
                      "moec.runtime.distributed.checkpoint, which stores it by parameter name")


class ShardedOptimizer(torch.optim.Optimizer):
    """The ZeroRedundancyOptimizers as one torch optimizer.

    param_groups are the caller's groups, so an LR scheduler drives them as it would
    a plain optimizer's; step() hands their settings to each part, whose groups are
    the same groups split by data-parallel group. state is this rank's shard (the
    state of the parameters it updates, keyed by parameter, the parts' own dicts):
    moec.runtime.distributed.checkpoint saves it under parameter names, so any layout,
    sharded or not, at any world size, resumes from it.
    """

    def __init__(self, param_groups: list[dict], parts: list):  # of ZeroRedundancyOptimizer
        self.parts = parts
        super().__init__(param_groups, parts[0].optim.defaults)

    @property
    def state(self) -> dict:
        return {p: s for part in self.parts for p, s in part.optim.state.items()}

    @state.setter
    def state(self, empty) -> None:
        pass  # Optimizer.__init__ sets an empty one: the state lives in the parts

    def step(self) -> None:
        for part in self.parts:
            for mine, theirs in zip(self.param_groups, part.param_groups):
                theirs.update((k, v) for k, v in mine.items() if k != "params")
            part.step()  # passes the settings on to its local optimizer, updates, broadcasts

    def state_dict(self):
        raise NotImplementedError(NOT_ONE_STATE_DICT)

    def load_state_dict(self, state_dict):
        raise NotImplementedError(NOT_ONE_STATE_DICT)


def make_optimizer(model: torch.nn.Module, optimizer_class=torch.optim.AdamW, param_groups: list | None = None,
                   **defaults) -> torch.optim.Optimizer:
    """optimizer_class over param_groups (default: model's trainable parameters), its state sharded
    ZeRO-1 style under torchrun; on one process the optimizer itself."""
    if param_groups is None:
        param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return optimizer_class(param_groups, **defaults)
    # imported here: torch.distributed.optim takes a fifth of a second of every train.py's start otherwise
    from torch.distributed.optim import ZeroRedundancyOptimizer

    experts = {id(p) for n, p in model.named_parameters() if is_expert(n)}
    parts = []
    for expert, group in ((False, groups.get("data")), (True, groups.get("ep_dp"))):
        # every part keeps every group (some empty), so group i is the same group in all of them
        split = [{**g, "params": [p for p in g["params"] if (id(p) in experts) == expert]} for g in param_groups]
        if any(g["params"] for g in split):
            parts.append(ZeroRedundancyOptimizer(split, optimizer_class, process_group=group, **defaults))
    return ShardedOptimizer(param_groups, parts)
