"""Upcycling at load time: an expert tensor made from its dense source tensor and its recipe entry.

A build stores the dense weights once; upcycle.json lists under "sources" the dense tensors its weights file
holds only to make experts from, and under "experts", for every expert tensor `<layer>.experts.<role>`
([E*M, ...], fine expert b*M+s = segment s of coarse expert b's copy) and shared-experts tensor
`<layer>.shared.<role>`, one entry:

    source      the dense tensor's name in the build's weights file
    rows        [start, stop) of its [out, in] view (a fused gate/up matrix holds two; stop null: to the end)
    transposed  whether the source is stored [in, out] (Conv1D)
    role        w1, w3, w2 (units along the source's columns), b1, b3 (units along its only dim), b2 (no units)
    experts, granularity    E coarse experts, M segments each
    scale       the factor the segment is multiplied by (M/(1+u) for w2, 1/(1+u) for b2, else 1)
    seed        the layer's; each expert's draws come from generators seeded by (seed, expert, what is drawn),
                so an expert is the same whichever experts a rank makes beside it (any EP size, any device)
    drop        units of each coarse expert drawn afresh from N(mean, std) of the source (Drop-Upcycling)
    mean, std   of the source, over all its entries (float32)
    noise       the std of the Gaussian noise added to every entry of a weight matrix (0: none)
    segments    of a shared-experts tensor (<layer>.shared.<role>): the segments it holds side by side; null
                for routed experts

Draws are made on the CPU and then moved, so a GPU rank makes the same experts as a CPU one.
"""
import torch

MASK, NOISE = 0, 8  # tags of what a generator draws, beside the role's own
ROLES = {"w1": 1, "w3": 2, "w2": 3, "b1": 4, "b3": 5, "b2": 6}
UNITS_ALONG_COLUMNS = ("w2",)


def seed_of(layer_seed: int, expert: int, tag: int) -> int:
    return ((layer_seed * 1_000_003 + expert) * 16 + tag) % 2**63


def _gen(layer_seed: int, expert: int, tag: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(layer_seed, expert, tag))


def units_first(entry: dict, source: torch.Tensor) -> torch.Tensor:
    """The source as [F, ...] (units first), or [D] for b2."""
    w = source.t() if entry["transposed"] else source
    w = w[entry["rows"][0]:entry["rows"][1]]
    return w.t() if entry["role"] in UNITS_ALONG_COLUMNS else w


def dropped_units(entry: dict, coarse: int, units: int) -> torch.Tensor:
    """The sorted unit indices coarse expert `coarse` draws afresh (the same for all its roles)."""
    return torch.randperm(units, generator=_gen(entry["seed"], coarse, MASK))[:entry["drop"]].sort().values


def make_expert(entry: dict, source: torch.Tensor, fine: int) -> torch.Tensor:
    """Fine expert `fine` of this entry's tensor, in float32 on the source's device."""
    w = units_first(entry, source)
    if entry["role"] == "b2":
        return w.float() * entry["scale"]
    M = entry["granularity"]
    b, s = divmod(fine, M)
    F = w.shape[0]
    width = F // M
    out = w[s * width:(s + 1) * width].float().clone()
    if entry["drop"]:
        units = dropped_units(entry, b, F)
        fill = entry["mean"] + entry["std"] * torch.randn((len(units), *w.shape[1:]),
                                                          generator=_gen(entry["seed"], b, ROLES[entry["role"]]))
        here = (units >= s * width) & (units < (s + 1) * width)
        out[units[here] - s * width] = fill[here].to(out.device)
    out *= entry["scale"]
    if entry["noise"] and entry["role"] in ("w1", "w3", "w2"):
        out += entry["noise"] * torch.randn(out.shape, generator=_gen(entry["seed"], fine, NOISE + ROLES[entry["role"]])
                                            ).to(out.device)
    return out.t() if entry["role"] in UNITS_ALONG_COLUMNS else out


def make_experts(entry: dict, source: torch.Tensor, experts: range, dtype=torch.float32) -> torch.Tensor:
    """[len(experts), ...] of this entry's tensor, on the source's device."""
    first = make_expert(entry, source, experts[0])
    out = torch.empty((len(experts), *first.shape), dtype=dtype, device=source.device)
    out[0] = first
    for i, e in enumerate(experts[1:], 1):
        out[i] = make_expert(entry, source, e)
    return out


def expert_shape(entry: dict, source_shape) -> tuple:
    """The shape of this entry's whole tensor ([E*M, ...] for routed experts), from its source's."""
    if entry["segments"] is not None:
        return tuple(make_shared(entry, torch.empty(source_shape, device="meta")).shape)
    w = units_first(entry, torch.empty(source_shape, device="meta"))
    n = entry["experts"] * entry["granularity"]
    if entry["role"] == "b2":
        return (n, *w.shape)
    segment = (w.shape[0] // entry["granularity"], *w.shape[1:])
    return (n, *(reversed(segment) if entry["role"] in UNITS_ALONG_COLUMNS else segment))


def make_shared(entry: dict, source: torch.Tensor) -> torch.Tensor:
    """A shared-experts tensor: the source's segments entry["segments"] side by side, times the scale, in
    float32 (no noise, no dropped units: shared experts are the dense FFN's)."""
    w = units_first(entry, source)
    if entry["role"] != "b2":
        width = w.shape[0] // entry["granularity"]
        w = torch.cat([w[s * width:(s + 1) * width] for s in entry["segments"]])
    out = w.float() * entry["scale"]
    return out.t() if entry["role"] in UNITS_ALONG_COLUMNS else out


def make(entry: dict, source: torch.Tensor, experts: range | None = None, dtype=torch.float32) -> torch.Tensor:
    """The tensor entry describes, on the source's device: a shared-experts one, or of a routed one the experts
    in `experts` (default all)."""
    if entry["segments"] is not None:
        return make_shared(entry, source).to(dtype)
    every = range(expert_shape(entry, source.shape)[0])
    return make_experts(entry, source, every if experts is None else experts, dtype)


def entry(source: str, rows, transposed: bool, role: str, experts: int, granularity: int, scale: float,
          seed: int, drop: int, mean: float, std: float, noise: float, segments: list | None = None) -> dict:
    return dict(source=source, rows=rows, transposed=transposed, role=role, experts=experts,
                granularity=granularity, scale=scale, seed=seed, drop=drop, mean=mean, std=std, noise=noise,
                segments=segments)


def upcycle_graph(gm: torch.nn.Module) -> torch.nn.Module:
    """Make every expert of a graph ffn_to_moe left placeholders in, in place, from the recipe and dense
    tensors it recorded (gm.meta): the graph as a one-process build would load it, for tests and checks
    that run the graph itself."""
    sources = gm.meta.get("upcycle_sources", {})
    for name, entry in gm.meta.get("upcycle", {}).items():
        *path, leaf = name.split(".")
        owner = gm.get_submodule(".".join(path))
        old = getattr(owner, leaf)
        made = make(entry, sources[entry["source"]], dtype=old.dtype)
        owner.register_parameter(leaf, torch.nn.Parameter(made, requires_grad=old.requires_grad))
    gm.meta["upcycle"] = {}
    return gm
