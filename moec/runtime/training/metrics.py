"""What a training step reports: expert load per MoE layer, and model FLOPs
utilisation (MFU) against the device's peak.

Dropped tokens follow the capacity rule of moec.runtime.ops.moe.capacity: with a capacity
factor f, each expert takes at most capacity(T, k, E, f) of the slots routed to
it on one rank and the rest are dropped.

FLOPs count what the model needs, not what ran (the PaLM convention):
6 * active_params per token for the matrix work, forward and backward, plus
attention's score and value products, 3x their forward FLOPs. The attention
part is measured once by running the model's forward on the meta device
under FlopCounterMode, so it holds for any attention shape the graph has.
"""
import torch
from torch.utils.flop_counter import FlopCounterMode

from moec.runtime.ops.moe import capacity

# Dense bf16 tensor-core peak, TFLOP/s per device torch sees (an MI250X shows
# as two devices, one per GCD). Vendors' datasheets.
PEAK_TFLOPS_BF16 = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "MI250X": 191.5,
    "MI300X": 1307.0,
}


def device_peak_flops(device: torch.device) -> float | None:
    """The device's bf16 peak in FLOP/s, or None for a CPU or a GPU not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS_BF16.items():  # longest names first where they share a prefix
        if key in name:
            return tflops * 1e12
    return None


def fake_forward(model_cls, batch: int, seq_len: int, counter=None, ep: int = 1) -> dict:
    """The model's outputs for a [batch, seq_len] step, on fake tensors: no memory, no
    compute, and data-dependent shapes (expert-parallel dispatch) allowed. An EP build's
    graph describes one rank (E/EP experts), so the model is given one rank's experts."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()), torch.no_grad():
        model = model_cls(device="meta")
        if ep > 1:
            from moec.runtime.distributed.params import shard_experts
            shard_experts(model, ep, 0)
        tokens = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
        if counter is None:
            return model(tokens)
        with counter:
            return model(tokens)


def attention_flops_per_step(model_cls, batch: int, seq_len: int, ep: int = 1) -> tuple[float, dict]:
    """Forward + backward FLOPs of scaled-dot-product attention for one [batch, seq_len] step, and the
    forward's (fake) outputs, for their shapes: every process starts with this forward, so it runs once."""
    counter = FlopCounterMode(display=False)
    out = fake_forward(model_cls, batch, seq_len, counter, ep)
    forward = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "scaled_dot_product" in str(op))
    return 3.0 * forward, out


def step_flops(active_params: int, tokens: int, attention_flops: float, tp: int = 1, split_params: int = 0) -> float:
    """One rank's FLOPs of a step of `tokens`: with TP, the ranks of a TP group share the same tokens and each
    computes 1/TP of the attention and of the split linears (split_params of the active ones)."""
    return 6.0 * (active_params - split_params + split_params / tp) * tokens + attention_flops / tp


def whole_token_params(model_cls, tp_plan: dict) -> int:
    """Under sequence parallelism, how many parameters compute on every token of a TP group on each of its
    ranks (neither split nor used on token shards: embeddings, head, final norm); the FLOPs of all the others
    divide by TP."""
    from moec.runtime.distributed.tensor_parallel import tp_layout

    names = set(tp_layout(tp_plan)) | {w for w, how in tp_plan.items() if how["style"] == "sequence"}
    return sum(p.numel() for n, p in model_cls(device="meta").named_parameters() if n not in names)


def split_params(model_cls, tp_plan: dict) -> int:
    """How many parameters tensor parallelism splits (config.json's tp_plan), counted on the meta device."""
    from moec.runtime.distributed.tensor_parallel import tp_layout

    names = tp_layout(tp_plan)
    return sum(p.numel() for n, p in model_cls(device="meta").named_parameters() if n in names)


def expert_load(counts: list, tokens: int, k: int, capacity_factor: float) -> torch.Tensor:
    """Flat float tensor on the counts' device: every MoE layer's slots per expert, then each layer's slots
    dropped (sum it over ranks for the step's global counts; load_summary reads it)."""
    parts = [c.detach().float() for c in counts]
    if not parts:
        return torch.zeros(0)
    dropped = [(c - capacity(tokens, k, c.numel(), capacity_factor)).clamp(min=0).sum() if capacity_factor > 0
               else c.new_zeros(()) for c in parts]
    return torch.cat(parts + [torch.stack(dropped)])


def load_summary(load: torch.Tensor, experts: list[int], ranks: int) -> list[dict]:
    """expert_load summed over ranks, one dict per layer (of experts[i] experts): slots of the busiest
    expert and of the average one, per rank; the coefficient of variation of the experts' slots (0 is
    even); the share of slots dropped."""
    counts, dropped = load[:sum(experts)].split(experts), load[sum(experts):]
    rows = []
    for c, d in zip(counts, dropped.tolist()):
        mean = c.mean().item()
        rows.append({"max": c.max().item() / ranks, "mean": mean / ranks,
                     "cv": c.std(correction=0).item() / mean if mean else 0.0, "dropped": d / max(c.sum().item(), 1)})
    return rows
