"""The NaN stop: the run ends at the first non-finite loss, before it reaches the weights, and names the
newest checkpoint from before the loss began to blow up (the last checkpoint is often already past it:
a loss of 1e5 one step, NaN the next)."""
import math

import torch
import torch.distributed as dist

from moec.base.errors import MoecError

BLOWUP = 2.0  # a loss this many times the lowest one before it marks the start of a divergence


class LossGuard:
    """Reading a loss on a GPU waits for the whole step, so where the optimizer can skip its update on the
    device the losses are read only when due (log and checkpoint steps, the last one): until then a
    device flag, raised by any rank's non-finite loss and never lowered, is the found_inf of every fused
    AdamW (GradScaler's hook), which then leaves the weights and its state as they were. Other optimizers,
    and every CPU run, where a read costs nothing, have each loss read at once."""

    def __init__(self, optimizer=None):
        self.losses: dict[int, float] = {}  # step -> the highest loss over the ranks (NaN when not finite)
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) not read yet
        self.skippers = _fused_adamws(optimizer)
        self.flag = None  # [] f32 on the losses' device: 1 once a loss was not finite

    def check(self, loss: torch.Tensor, step: int, checkpointer, due: bool = True) -> None:
        """Record step's loss, before the weights change; read what is recorded when due (or where no
        optimizer skips on the device); MoecError when a loss was not finite on any rank."""
        loss = loss.detach().float()
        self.pending.append((step, loss))
        if not self.skippers:
            return self.read(checkpointer)
        bad = (~torch.isfinite(loss)).float()
        if dist.is_initialized():  # every rank skips the same steps
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if self.flag is None:
            self.flag = bad
            for optimizer in self.skippers:
                optimizer.found_inf = self.flag
        else:
            torch.maximum(self.flag, bad, out=self.flag)
        if due:
            self.read(checkpointer)

    def read(self, checkpointer) -> None:
        """Read the losses recorded since the last read (one transfer); MoecError naming the first that was
        not finite on any rank. Call it before saving weights."""
        if not self.pending:
            return
        values = torch.stack([loss for _, loss in self.pending]).to(torch.float64)
        bad = ~torch.isfinite(values)
        t = torch.stack([bad.to(torch.float64), torch.where(bad, 0.0, values)])  # [2, steps]
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        steps = [step for step, _ in self.pending]
        self.pending = []
        first_bad = None
        for step, is_bad, value in zip(steps, *t.tolist()):
            self.losses[step] = math.nan if is_bad else value
            if is_bad and first_bad is None:
                first_bad = step
        if first_bad is not None:
            raise MoecError(f"loss is not finite at step {first_bad}; stopped before updating the weights. "
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


def _fused_adamws(optimizer) -> list:
    """The torch optimizers that do the update (a ZeRO optimizer's parts), if every one is a fused AdamW,
    the only kind that takes found_inf; else []."""
    if optimizer is None:
        return []
    parts = [p.optim for p in optimizer.parts] if hasattr(optimizer, "parts") else [optimizer]
    fused = all(isinstance(p, torch.optim.Adam) and p.defaults.get("fused") for p in parts)
    return parts if fused else []
