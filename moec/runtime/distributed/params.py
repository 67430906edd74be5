"""Which parameters are experts, keeping this rank's slice of them, and the gradient reduction.

Expert weights are named `<layer>.experts.{w1,w3,w2,b1,b3,b2}` (ffn_to_moe's
layout, [E, ...]); insert_collectives checks that every expert weight its
experts ops read is named so. A rank of EP index j keeps experts
j*E/EP .. (j+1)*E/EP - 1.

Gradients: every rank's loss is the mean over its own tokens, the global
loss the mean over ranks, so a replicated parameter's gradient is the mean
over "data". An expert's gradient on rank (d, j) already sums the
contributions of all tokens of replica d (the combine's backward brought
them back), so it is summed over "ep_dp" and divided by the world size.

Under sequence parallelism each rank of a TP group computes on its share of the tokens outside the split
linears: the gradients of the parameters used there (norms, biases after a row-parallel linear, routers,
experts) are this rank's part of the group's, so they are summed over "tp" as well; after that they are the
same on every rank of the group, and counted once in the norm like any replicated parameter.
"""
import re

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moec.runtime.distributed import groups

EXPERT_PARAM = re.compile(r"(^|\.)experts\.(w1|w3|w2|b1|b3|b2)$")


def is_expert(name: str) -> bool:
    return bool(EXPERT_PARAM.search(name))


def expert_slice(num_experts: int, ep: int, j: int) -> slice:
    local = num_experts // ep
    return slice(j * local, (j + 1) * local)


def shard_experts(model: torch.nn.Module, ep: int, j: int) -> list[str]:
    """Replace each expert parameter by this rank's slice; the names replaced."""
    names = []
    for name, p in list(model.named_parameters()):
        if not is_expert(name):
            continue
        *path, leaf = name.split(".")
        owner = model.get_submodule(".".join(path))
        local = p.detach()[expert_slice(p.shape[0], ep, j)].clone()
        owner.register_parameter(leaf, torch.nn.Parameter(local, requires_grad=p.requires_grad))
        names.append(name)
    return names


class GradSync:
    """Call after backward, before the optimizer step: one flat all-reduce per group. shared: {name: (shape,
    dtype, counted)} of the parameters more than one stage of a pipeline holds (tied embeddings), the same
    on every rank of it, their gradients summed over "pp"; counted: whether this rank counts it in the norm.
    tp_split: names of the parameters this rank holds a tensor-parallel slice of (the other parameters are
    the same on every rank of a TP group, and so are their gradients). tp_partial: names of the parameters
    used on a token shard under sequence parallelism, whose gradients are summed over "tp"."""

    def __init__(self, model: torch.nn.Module, shared: dict | None = None, tp_split=(), tp_partial=()):
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.expert = [p for n, p in params if is_expert(n)]
        self.dense = [p for n, p in params if not is_expert(n)]
        self.tp_names = set(tp_split), set(tp_partial)
        self.tp_split = [p for n, p in params if n in self.tp_names[0]]  # slices of linears split over "tp"
        self.tp_partial = [p for n, p in params if n in self.tp_names[1]]
        self.shared, self.named = shared or {}, dict(params)
        uncounted = {id(self.named[n]) for n, (_, _, counted) in self.shared.items() if not counted and n in self.named}
        self.norm_dense = [p for p in self.dense if id(p) not in uncounted]

    def over(self, model: torch.nn.Module, shared: dict) -> "GradSync":
        """The same synchronisation for model (a pipeline rank's stages, part of the model this one was made
        for), whose tied weights are shared across its stages as `shared` says."""
        return GradSync(model, shared, *self.tp_names)

    def __call__(self) -> None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world == 1:
            return
        ranks = groups.size("data")  # every rank but those of other pipeline stages: the mean is over these
        for params, group in ((self.dense, groups.get("data")), (self.expert, groups.get("ep_dp"))):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if not grads:
                continue
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            flat /= ranks
            for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
                p.grad = g
        if self.tp_partial:  # sequence parallelism: each TP rank's part of the group's gradient
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.tp_partial]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=groups.get("tp"))
            for p, g in zip(self.tp_partial, _unflatten_dense_tensors(flat, grads)):
                p.grad = g
        for name, (shape, dtype, _) in sorted(self.shared.items()):  # a tied weight's uses on several stages
            p = self.named.get(name)
            device = (self.dense or self.expert)[0].device  # where this rank's collectives run
            grad = p.grad if p is not None and p.grad is not None else torch.zeros(shape, dtype=dtype, device=device)
            dist.all_reduce(grad, group=groups.get("pp"))
            if p is not None:
                p.grad = grad

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """clip_grad_norm_ over the whole model: this rank holds only its experts, its slices of the TP-split
        linears (and its pipeline stage), so the squared norms are summed over the EP group, the TP group (and
        the pipeline) before scaling (call after __call__)."""
        params = self.dense + self.expert
        sq = lambda ps: sum((p.grad.float().square().sum() for p in ps if p.grad is not None),
                            torch.zeros((), device=params[0].device))
        expert_sq = sq(self.expert)
        if groups.get("ep") is not None:
            dist.all_reduce(expert_sq, group=groups.get("ep"))
        split = {id(p) for p in self.tp_split}
        split_sq = sq(self.tp_split)
        if split:
            dist.all_reduce(split_sq, group=groups.get("tp"))
        total_sq = sq([p for p in self.norm_dense if id(p) not in split]) + expert_sq + split_sq
        if groups.get("pp") is not None:
            dist.all_reduce(total_sq, group=groups.get("pp"))
        total = total_sq.sqrt()
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.dtype))
        return total
