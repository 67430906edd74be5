"""Aux-loss-free balancing (DeepSeek-V3): each MoE layer's router.bias
is added to the router scores when experts are chosen (never to the gate
weights), and after each optimizer step it moves by `rate` toward the even
load: up for the experts that got fewer slots than the mean, down for those
that got more. The counts are those of every micro-batch of the step, summed
over all ranks, so gradient accumulation, data and expert parallelism count
each token once and every rank moves its biases the same way. The biases are
buffers of the model: checkpoints and the exported weights carry them.

A fresh run first fits the biases to its own first micro-batch (calibrate): the
compile-time bias balances the calibration text at its window length, and the
hidden states the routers see change with the data, the sequence length (a
token's FFN input depends on how many tokens it attends to) and the device's
arithmetic; a fixed step a training step takes many steps to cover that gap.

Training opens the same gap at every step: the routers and the layers below
them move the scores faster than a fixed step follows, and a larger fixed
step overshoots, since a token's candidate scores lie close together. So after
the rate's step, train.py refits the biases to the step's last micro-batch
with the updated weights (fit, a few forwards): the next step's tokens then
meet biases that balanced tokens already trained on, under the weights they
will be routed by."""
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
        counts = self._biased_counts(out)
        self.counts = counts if self.counts is None else self.counts + counts

    def _biased_counts(self, out: dict) -> torch.Tensor:
        """The slots of the layers that have a bias, one flat float64 tensor; self.sizes splits it by layer."""
        counts = [c.detach().to(torch.float64) for c, n in zip(out["expert_counts"], self.layers) if n is not None]
        self.sizes = [c.numel() for c in counts]
        return torch.cat(counts)

    def calibrate(self, model: torch.nn.Module, loss_of, inputs, targets, iters: int = 40):
        """Fit the biases to one micro-batch before training (fit, iters + 1 forwards). Returns the worst
        layer's max/mean load before and after, or None when no layer has a bias or a pipeline stage holds
        only some of them."""
        if not self.biases or any(b is None for b in self.biases):
            return None
        first, best = self.fit(model, loss_of, inputs, targets, iters + 1)
        return first.max().item(), best.max().item()

    @torch.no_grad()
    def fit(self, model: torch.nn.Module, loss_of, inputs, targets, forwards: int):
        """Fit the biases to one micro-batch: forwards with no gradient (eval mode, so no dropout draws),
        each moving every bias by its own step toward the even load of the counts summed over the ranks; a
        step grows while its expert stays on one side of the mean and halves when it crosses (Rprop), since
        how far a bias must move depends on how close the scores lie. Each layer keeps the biases of its
        most even forward. Every rank runs the same forwards and keeps the same biases. Nothing is read
        back to the host, so train.py can refit every step. Returns each layer's max/mean load at the first
        forward and at the kept biases, on the device."""
        was_training = model.training
        model.eval()
        steps = [torch.full_like(b, 0.01 / b.numel()) for b in self.biases]
        last = [torch.zeros_like(b) for b in self.biases]
        kept = [b.clone() for b in self.biases]
        first = best = None
        for i in range(forwards):
            _, out = loss_of(inputs, targets)
            counts = self._biased_counts(out)
            if dist.is_initialized():
                dist.all_reduce(counts)
            parts = counts.split(self.sizes)
            worst = torch.stack([c.max() / c.mean() for c in parts])  # [L]
            first = worst if first is None else first
            better = worst < best if best is not None else torch.ones_like(worst, dtype=torch.bool)
            best = worst if best is None else torch.minimum(worst, best)
            for bias, keep, better_here in zip(self.biases, kept, better):
                keep.copy_(torch.where(better_here, bias, keep))
            if i + 1 == forwards:
                break  # a move no forward measures is not kept
            for bias, c, step, previous in zip(self.biases, parts, steps, last):
                direction = torch.sign(c.mean() - c).to(bias)
                step.copy_(torch.where(direction * previous < 0, step / 2,
                                       torch.where(direction * previous > 0, step * 1.2, step)))
                bias += step * direction
                bias -= bias.mean()
                previous.copy_(direction)
        for bias, keep in zip(self.biases, kept):
            bias.copy_(keep)
        model.train(was_training)
        return first, best

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
