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
the rate's step the biases are refitted (refit) to the router logits of the
step's last micro-batch under the updated routers: the forward returns each
such layer's router input h [T, D] (router_inputs, detached), add() keeps a
copy, and after optimizer.step() the logits are h @ W_router^T again with the
new weights (one [T, D] x [D, E] matmul a layer; the routers have no bias or
scale), then a few top-k passes over [T, E] per layer, all on the device.
That follows the routers' own update; h moves too with the layers below (on
the CPU GPT of BENCHMARKS.md more than the routers' update moves the logits),
which train.py --bias-refit-forward follows with one more forward of the
micro-batch after the step (rescore).
Memory: the kept inputs are T x D a layer (bf16 on a GPU, what autocast feeds
the router; the input's dtype elsewhere), from the last micro-batch's forward
to the end of its step; nothing of them is checkpointed.

Legend: L layers of one shape, T tokens, D hidden, E experts, K top-k."""
import torch
import torch.distributed as dist

from moec.base.errors import MoecError

REFIT_MOVE = 0.8  # of each iteration's per-expert move: the experts move together, so a full move overshoots


class ExpertBias:
    def __init__(self, model: torch.nn.Module, names: list, rate: float, topk: int = 0, score: str = "softmax",
                 refit: int = 0):
        """names: the router.bias buffer of each MoE layer in the order of the forward's expert_counts, None
        for a layer without one (hash and expert-choice layers); the router.weight beside each is what the
        refit scores with; topk, score: the routers' (top-k over fine experts); refit: iterations of the
        per-step refit (0: the rate's step only)."""
        self.rate, self.topk, self.score, self.refit_iters = rate, topk, score, refit
        self.inputs = None  # the router inputs of the step's last micro-batch
        held, params = dict(model.named_buffers()), dict(model.named_parameters())  # a pipeline stage holds
        self.layers = list(names) if rate > 0 else []  # its own layers' only
        biased = [n for n in self.layers if n is not None]
        self.biases = [held.get(n) for n in biased]  # None: on another stage
        self.weights = [params.get(n.removesuffix("bias") + "weight") for n in biased]
        for name, bias, weight in zip(biased, self.biases, self.weights):
            if refit and bias is not None and weight is None:
                raise RuntimeError(f"the refit scores with the router weight beside {name}, which the model lacks")
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
        if self.refit_iters:
            self._keep(out)

    def _keep(self, out: dict) -> None:
        if "router_logits" in out and "router_inputs" not in out:
            raise MoecError("this build's model.py returns router_logits, and the bias refit scores router_inputs: "
                            "recompile the build with this moec (or pass --bias-refit 0)")
        if out.get("router_inputs"):  # copies: a CUDA graph's replay overwrites its outputs
            self.inputs = [x.to(torch.bfloat16 if x.is_cuda else x.dtype, copy=True) for x in out["router_inputs"]]

    @torch.no_grad()
    def rescore(self, model: torch.nn.Module, loss_of, inputs, targets) -> None:
        """Replace the recorded router inputs with those of a forward of (inputs, targets) under the model's
        weights now (eval mode, no gradient): after optimizer.step(), the step's tokens as the updated layers
        below the routers give them, which the next step's tokens resemble more than the step's own forward."""
        was_training = model.training
        model.eval()
        _, out = loss_of(inputs, targets)
        model.train(was_training)
        self._keep(out)

    @torch.no_grad()
    def router_logits(self) -> list:
        """The recorded router inputs scored by the routers' weights now: [T, E] fp32 a layer, what a forward
        of the same inputs computes (up to the rounding of autocast's bf16 on a GPU)."""
        return [torch.nn.functional.linear(h.float(), _whole(w).float()) for h, w in zip(self.inputs, self.weights)]

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
        back to the host. Returns each layer's max/mean load at the first forward and at the kept biases,
        on the device."""
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
            better, best = _more_even(worst, best)
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
        if self.inputs is not None and all(b is not None for b in self.biases + self.weights):
            self.refit(self.router_logits(), self.refit_iters)
        self.inputs = None

    @torch.no_grad()
    def refit(self, logits: list, iters: int) -> torch.Tensor:
        """Move each layer's bias so that top-k over its scores (logits [T, E] a layer) plus the bias is as even
        as it gets: per iteration each expert's bias moves, by REFIT_MOVE of the way, to where as many tokens
        pick it as the mean load, the others held (the midpoint of its (T*K/E)-th and next largest margin, a
        token's margin being how far its score is above the score that would displace it from the top-k, or
        below the one it would displace). Under data or expert parallelism the moves are averaged and the loads
        summed over all ranks (one all-reduce an iteration), so every rank keeps the same biases. Each layer
        keeps its most even iterate, the starting bias included. Nothing is read back to the host. Returns each
        layer's max/mean load at the kept biases [L]."""
        if not self.topk:
            raise RuntimeError("ExpertBias.refit needs the routers' topk")
        worst = [None] * len(self.biases)
        shapes = {}
        for i, x in enumerate(logits):  # layers of one shape fit as one batch
            shapes.setdefault(tuple(x.shape), []).append(i)
        for shape, layers in shapes.items():
            T, E = shape
            if self.topk >= E or T < 2:
                continue  # every expert is chosen, or no tokens to fit to
            x = torch.stack([logits[i] for i in layers]).float()  # [L, T, E]
            scores = x.softmax(-1) if self.score == "softmax" else x.sigmoid()
            bias = torch.stack([self.biases[i] for i in layers]).float()  # [L, E]
            kept, best = self._refit(scores, bias, iters)
            for j, i in enumerate(layers):
                self.biases[i].copy_(kept[j])
                worst[i] = best[j]
        fitted = [w for w in worst if w is not None]
        return torch.stack(fitted) if fitted else None

    def _refit(self, scores: torch.Tensor, bias: torch.Tensor, iters: int):
        K, (L, T, E) = self.topk, scores.shape
        n = max(1, min(T - 1, round(T * K / E)))  # the mean load
        world = dist.get_world_size() if dist.is_initialized() else 1
        kept, best = bias.clone(), None
        for i in range(iters + 1):
            sel = scores + bias[:, None, :]  # [L, T, E]
            top = sel.topk(K + 1, dim=-1)  # [L, T, K+1]
            chosen = torch.zeros_like(sel, dtype=torch.bool).scatter_(-1, top.indices[..., :K], True)
            counts = chosen.sum(1).to(bias)  # [L, E]
            move = torch.zeros_like(counts)  # the last iterate is only measured
            if i < iters:
                margin = sel - torch.where(chosen, top.values[..., K:], top.values[..., K - 1:K])  # [L, T, E]
                nth = margin.transpose(1, 2).topk(n + 1, dim=-1).values  # [L, E, n+1]
                move = (nth[..., n - 1] + nth[..., n]) / 2  # [L, E]
            if world > 1:
                both = torch.cat([counts, move / world])
                dist.all_reduce(both)
                counts, move = both.split(L)
            worst = counts.max(-1).values / counts.mean(-1)  # [L]
            better, best = _more_even(worst, best)
            kept = torch.where(better[:, None], bias, kept)
            bias = bias - REFIT_MOVE * move
            bias = bias - bias.mean(-1, keepdim=True)
        return kept, best


def _whole(weight: torch.Tensor) -> torch.Tensor:
    """A router weight whole on this rank: FSDP2 shards it (a DTensor; every rank gathers it, in the same
    order); elsewhere each rank holds all of it."""
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def _more_even(worst: torch.Tensor, best: torch.Tensor | None) -> tuple:
    """(the layers whose max/mean load `worst` [L] beats their best so far, the best now): each layer keeps
    the biases of its most even iterate, the first always."""
    if best is None:
        return torch.ones_like(worst, dtype=torch.bool), worst
    return worst < best, torch.minimum(worst, best)
