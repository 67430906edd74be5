"""Learning-rate schedule: linear warmup, then cosine decay to min_ratio * peak."""
import math

import torch


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at this step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduler(optimizer, warmup: int, total: int, min_ratio: float = 0.1, start: int = 0, peak: float | None = None):
    """The schedule after `start` steps, at the peak LR given now (peak: the groups' LR when None): a
    resumed run follows its new flags from the resumed step on, and its old ones give the same LRs as an
    uninterrupted run."""
    if start:
        for group in optimizer.param_groups:
            group["initial_lr"] = peak if peak is not None else group["lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total, min_ratio),
                                             last_epoch=start - 1)
