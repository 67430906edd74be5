"""Where a run starts: step 0, or the step of the checkpoint --resume (--resume-from STEP) restores,
said on the console with the flags that changed since the run's last start."""
import sys

from moec.base.errors import MoecError
from moec.runtime.training.loop import set_rng_state
from moec.runtime.training.rundir import changed_flags


def resume(ckpt, model, optimizer, args, before: dict, rank: int) -> int:
    """The number of steps done: restores model, optimizer and RNG from the checkpoint chosen."""
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if rank == 0 else (lambda m: None)
    if not args.resume and args.resume_from is None:
        return 0
    state = ckpt.load_latest(model, optimizer, log=say, at_most=args.resume_from)
    if state is None:
        say(f"resume: no usable checkpoint in {ckpt.root}" + (f" at or before step {args.resume_from}"
                                                             if args.resume_from else "") + ": starting at step 1")
        return 0
    start = state["step"]
    if start >= args.steps:
        raise MoecError(f"--resume: the run is at step {start} already and --steps is {args.steps}: pass a larger "
                        f"--steps to train on")
    set_rng_state(state["rng"])
    if rank == 0 and (moved := ckpt.set_aside_after(start, ckpt.root.parent / "abandoned")):
        # a branch the run leaves (a divergence, or a damaged newest one): out of pruning's and --resume's way
        say(f"resume: moved {', '.join(moved)} (past step {start}) to {ckpt.root.parent / 'abandoned'}")
    changed = changed_flags(before, args)
    say(f"resume: from {state['path']} (step {start}), training steps {start + 1}..{args.steps}"
        + (f"; changed since the last start, applied from step {start + 1}: {', '.join(changed)}" if changed else ""))
    return start
