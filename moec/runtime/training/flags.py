"""train.py's flags checked before any work: a value that would crash later, or quietly do something
else than it says, is one line and exit 2."""
import torch

from moec.base.errors import MoecError

AT_LEAST = {"steps": 1, "batch_size": 1, "grad_accum": 1, "seq_len": 1, "log_every": 1, "eval_batches": 1,
            "keep": 1, "warmup": 0, "eval_every": 0, "ckpt_every": -1, "bias_fit": 0,
            "bias_refit": 0}
WHY = {"eval_batches": " (--val-fraction 0 turns validation off)", "keep": " (--ckpt-every -1 writes none)",
       "ckpt_every": " (0: only at the end, -1: never)", "bias_fit": " (0: keep the compiled biases)",
       "bias_refit": " (0: no refit)"}


def check_flags(args) -> None:
    for name, low in AT_LEAST.items():
        if getattr(args, name) < low:
            raise MoecError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least {low}"
                            + WHY.get(name, ""))
    if not 0 <= args.val_fraction < 1:
        raise MoecError(f"--val-fraction {args.val_fraction}: must be at least 0 (no validation) and below 1")
    if not args.lr > 0:
        raise MoecError(f"--lr {args.lr}: must be above 0")
    if not 0 <= args.min_lr_ratio <= 1:
        raise MoecError(f"--min-lr-ratio {args.min_lr_ratio}: must be between 0 and 1")
    if args.grad_clip < 0:
        raise MoecError(f"--grad-clip {args.grad_clip}: must be at least 0 (0: no clipping)")
    if not args.dist_timeout > 0:
        raise MoecError(f"--dist-timeout {args.dist_timeout}: must be above 0 seconds")
    if args.resume_from is not None and args.resume_from < 1:
        raise MoecError(f"--resume-from {args.resume_from}: a checkpoint's step, at least 1")
    if args.bias_refit_forward and args.bias_refit == 0:
        raise MoecError("--bias-refit-forward scores a micro-batch again for the refit, which --bias-refit 0 turns "
                        "off: drop one of them")
    if args.overwrite and (args.resume or args.resume_from is not None):
        raise MoecError("--overwrite starts the run over and --resume continues it: pass one of them")
    if args.cuda_graphs and args.compile == "off":
        raise MoecError("--cuda-graphs replays the compiled model's graphs, which --compile off turns off: "
                        "drop one of them")
    on_gpu = args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()
    for flag, on in (("--cuda-graphs", args.cuda_graphs), ("--debug-syncs", args.debug_syncs)):
        if on and not on_gpu:
            raise MoecError(f"{flag} needs a CUDA GPU, and this run is on the CPU: drop it, or run on a GPU "
                            f"(--device cuda)")


def compiles(args, device: torch.device, pipelined: bool) -> bool:
    """Whether train.py runs its model under torch.compile: --compile on or off as given; auto compiles on a
    GPU, where it measured faster than eager for both the dense and the MoE builds (BENCHMARKS.md), except
    pipeline stages, which run eager, and not on the CPU, where compiling costs more than short runs gain."""
    if args.compile != "auto":
        return args.compile == "on"
    return device.type == "cuda" and not pipelined
