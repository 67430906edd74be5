"""How the routers of ffn_to_moe's MoE layers start: router rows (random, centred, k-means), the selection
bias that balances the calibration tokens, and the token-id tables of hash layers."""
import torch


ROW_STD = 0.02  # of a random router row's entries; the data-aware inits keep that row norm


def router_rows(E: int, D: int, gen, init: str, x: torch.Tensor | None) -> torch.Tensor:
    """[E, D] router rows, one per (coarse) expert. Every init keeps the step-0 equivalence (identical
    experts, renormalised weights: the router only decides which copies compute). x: [N, D] FFN inputs
    on calibration tokens, or None (then random).
      random    N(0, ROW_STD^2) entries.
      centered  random rows with the inputs' mean direction projected out: hidden states share a large
                mean, along which random rows send every token to the same expert.
      kmeans    centroids of balanced spherical k-means over the centred inputs, each expert a region
                of the input space holding an equal share of the calibration tokens."""
    rows = torch.randn(E, D, generator=gen) * ROW_STD
    if init == "random" or x is None:
        return rows
    mean = x.mean(0)
    unit = mean / mean.norm().clamp_min(1e-12)
    if init == "kmeans":
        rows = _balanced_kmeans(x - mean, E, gen) * (ROW_STD * D ** 0.5)
    return rows - (rows @ unit)[:, None] * unit


def hash_table(vocab: int, E: int, K: int, M: int, gen, device, frequency) -> torch.Tensor:
    """[vocab, K*M] int32: K distinct blocks per token id, each block's M fine experts in a row. Hash Layers'
    balanced assignment: the token ids of the calibration text, most frequent first, each to the K blocks
    with the fewest calibration tokens so far, ties broken in an order drawn from gen, so that layers with
    generators of their own hash differently; ids the text lacks get K random blocks."""
    if device.type == "meta":
        return torch.empty(vocab, K * M, dtype=torch.int32, device="meta")
    blocks = torch.rand(vocab, E, generator=gen).argsort(-1)[:, :K]  # [V, K]
    order = torch.randperm(E, generator=gen)  # the blocks in tie-breaking order
    load = torch.zeros(E, dtype=torch.float64)  # in that order
    seen = frequency.nonzero().flatten()
    for v in seen[frequency[seen].argsort(descending=True, stable=True)].tolist():
        least = torch.sort(load, stable=True).indices[:K]  # equal loads: earlier in the order first
        blocks[v] = order[least]
        load[least] += frequency[v].item()
    return (blocks[:, :, None] * M + torch.arange(M)).reshape(vocab, K * M).to(torch.int32)


def selection_scores(logits: torch.Tensor, router: str) -> torch.Tensor:
    return torch.softmax(logits, -1) if router == "softmax" else torch.sigmoid(logits)


def balancing_bias(scores: torch.Tensor, k: int, iters: int = 300) -> torch.Tensor:
    """[E] zero-mean selection bias under which the top-k of scores + bias [N, E] spreads the N calibration
    tokens' slots evenly, so training starts where its balancing would settle instead of far from it.
    The training-time move (toward the mean load), with a step per expert that halves when its load
    crosses the mean and grows while it does not (Rprop): the scores that separate tokens can differ by
    far less than the scores of the experts do."""
    E = scores.shape[1]
    bias = torch.zeros(E)
    step = scores.std(0).clamp_min(1e-12)  # [E] the spread of each expert's score over the tokens
    last = torch.zeros(E)
    for _ in range(iters):
        counts = torch.bincount(torch.topk(scores + bias, k).indices.flatten(), minlength=E).float()
        direction = torch.sign(counts.mean() - counts)
        step = torch.where(direction * last < 0, step / 2, torch.where(direction * last > 0, step * 1.2, step))
        bias += step * direction
        bias -= bias.mean()
        last = direction
    return bias


def _balanced_kmeans(x: torch.Tensor, E: int, gen, iters: int = 10) -> torch.Tensor:
    """[E, D] unit centroids: spherical k-means whose assignment gives each cluster at most ceil(N/E)
    points (greedy, most confident points first)."""
    points = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    N = points.shape[0]
    centroids = points[torch.randperm(N, generator=gen)[:E]] if N >= E else torch.randn(E, x.shape[1], generator=gen)
    room = -(-N // E)
    for _ in range(iters):
        sims = points @ centroids.t()  # [N, E]
        assign = torch.full((N,), -1)
        left = torch.full((E,), room)
        for flat in sims.flatten().argsort(descending=True).tolist():
            n, e = divmod(flat, E)
            if assign[n] < 0 and left[e] > 0:
                assign[n], left[e] = e, left[e] - 1
        for e in range(E):
            members = points[assign == e]
            if len(members):
                centroids[e] = members.sum(0)
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return centroids
