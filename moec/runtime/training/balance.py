"""Aux-loss-free load balancing (DeepSeek-V3): each MoE layer's router.bias
is added to the router scores when experts are chosen (never to the gate
weights), and after each optimizer step it moves by `rate` toward the even
load: up for the experts that got fewer slots than the mean, down for those
that got more. The counts are those of every micro-batch of the step, summed
over all ranks, so gradient accumulation, data and expert parallelism count
each token once and every rank moves its biases the same way. The biases are
buffers of the model: checkpoints and the exported weights carry them."""
import torch
import torch.distributed as dist


class ExpertBias:
    def __init__(self, model: torch.nn.Module, names: list, rate: float):
        """names: the router.bias buffer of each MoE layer in the order of the forward's expert_counts, None
        for a layer without one (hash and expert-choice layers)."""
        self.rate = rate
        held = dict(model.named_buffers())  # a pipeline stage holds its own layers' biases only
        self.layers = [n for n in names] if rate > 0 else []
        self.biases = [held.get(n) for n in self.layers if n is not None]  # None: on another stage
        self.counts = None

    def add(self, out: dict) -> None:
        """Count one micro-batch's slots (the forward's expert_counts)."""
        if self.rate == 0 or "expert_counts" not in out:
            return
        if len(out["expert_counts"]) != len(self.layers):
            raise RuntimeError(f"the model routes {len(out['expert_counts'])} MoE layers and config.json names "
                               f"{len(self.layers)}: recompile the build")
        if not self.biases:
            return
        counts = [c.detach().to(torch.float64) for c, n in zip(out["expert_counts"], self.layers) if n is not None]
        self.sizes = [c.numel() for c in counts]
        counts = torch.cat(counts)
        self.counts = counts if self.counts is None else self.counts + counts

    def step(self) -> None:
        """Move the biases by the step's counts; call after optimizer.step()."""
        if self.counts is None:
            return
        if dist.is_initialized():
            dist.all_reduce(self.counts)
        with torch.no_grad():
            for bias, counts in zip(self.biases, self.counts.split(self.sizes)):
                if bias is None:
                    continue
                bias += self.rate * torch.sign(counts.mean() - counts).to(bias)
                bias -= bias.mean()  # only differences steer; a drifting mean would eat float precision
        self.counts = None
