"""The NaN stop: the run ends at the first non-finite loss, before it reaches the weights, and names the
newest checkpoint from before the loss began to blow up (the last checkpoint is often already past it:
a loss of 1e5 one step, NaN the next)."""
import math

import torch
import torch.distributed as dist

from moec.base.errors import MoecError

BLOWUP = 2.0  # a loss this many times the lowest one before it marks the start of a divergence


class LossGuard:
    def __init__(self):
        self.losses: dict[int, float] = {}  # step -> the highest loss over the ranks (NaN when not finite)

    def check(self, loss: torch.Tensor, step: int, checkpointer) -> None:
        """Record step's loss; MoecError when it is not finite on any rank."""
        value = float(loss.detach())
        bad = not math.isfinite(value)
        if dist.is_initialized():
            t = torch.tensor([float(bad), 0.0 if bad else value], device=loss.device, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            bad, value = bool(t[0].item()), t[1].item()
        self.losses[step] = math.nan if bad else value
        if bad:
            raise MoecError(f"loss is not finite at step {step}; stopped before updating the weights. "
                            + self._advice(checkpointer))

    def _diverged_at(self) -> int:
        """The first step whose loss was non-finite or BLOWUP times the lowest before it."""
        low = math.inf
        for step, value in sorted(self.losses.items()):
            if not value <= BLOWUP * low:
                return step
            low = min(low, value)
        raise AssertionError("called after a finite loss")

    def _advice(self, checkpointer) -> str:
        start = self._diverged_at()
        # checkpoint s holds the weights that computed step s + 1's loss
        good = [s for s in checkpointer.intact_steps() if s + 1 < start]
        lead = f"the loss began to blow up at step {start} ({self.losses[start]:.6g}); " \
            if math.isfinite(self.losses[start]) else ""
        advice = lead + (f"checkpoint step {good[-1]} is from before it: lower --lr or raise --warmup and rerun "
                         f"with --resume-from {good[-1]}" if good else
                         "no checkpoint is from before it: lower --lr or raise --warmup and rerun with --overwrite")
        return advice[0].upper() + advice[1:]
