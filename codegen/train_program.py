"""Emit train.py into a build dir: the program a user runs as it is,

    python BUILD/train.py --steps 200                 # CPU or one GPU
    torchrun --nproc_per_node 8 BUILD/train.py        # data parallel over 8 GPUs

It reads like a recipe (AdamW, warmup + cosine, clipping, bf16 autocast on
GPU, MoE losses added to the LM loss) and imports only the build's model.py
and moec.runtime; the machinery (data, checkpoints, metrics) lives in
moec.runtime.training so the file stays short enough to edit.
"""
from pathlib import Path

from moec.base.options import stages_per_rank

TEMPLATE = '''"""Train {title}.

    python train.py --steps 200                  # one CPU or GPU
    torchrun --nproc_per_node 8 train.py         # data parallel (DDP; --fsdp for FSDP2), or the plan the build
                                                 # was compiled with (--ep, --pp); --zero shards the optimizer state
    python train.py --steps 200 --resume         # continue from the run's newest checkpoint

A run dir holds one run (run.json says whose): a fresh start in a used one is refused
(--resume continues it, --overwrite starts over); a resume applies the flags it is given.

Written by `moec compile`; edit freely. Run `python train.py --help` for the options.
"""
import argparse
import atexit
import gc
import math
import sys
from pathlib import Path

# The imports make a quarter of a million objects that live as long as the run: collecting garbage among them
# while they are made frees nothing (0.4 s of a start on CPU), and once frozen no later collection walks them.
# An exit other than run_main's (--help, a bad flag, a crash) unfreezes them for the interpreter's last
# collection: left uncollected, Triton's bindings report them as leaks.
gc.disable()
atexit.register(gc.unfreeze)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # model.py and kernels/ of this build

import moec.runtime as rt  # noqa: E402
from model import Model  # noqa: E402

gc.freeze()
gc.enable()


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default={batch_size}, help="sequences per rank per micro-batch")
    p.add_argument("--grad-accum", type=int, default={grad_accum},
                   help="micro-batches per optimizer step (a pipeline's: at least its ranks)")
    p.add_argument("--seq-len", type=int, default={seq_len}, help="tokens per sequence, at most the model's context")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient norm cap; 0: no clipping")
    p.add_argument("--data", default=None, help="text file or .bin of token ids; default: the embedded text")
    p.add_argument("--data-dtype", default="uint16", choices=["uint16", "uint32"], help="token id type of a .bin")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="tail of the data held out for validation; 0: no validation")
    p.add_argument("--eval-every", type=int, default=50,
                   help="steps between validations, and one at the end (0: only that one)")
    p.add_argument("--eval-batches", type=int, default=8, help="batches per validation")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=100,
                   help="0: only at the end; -1: never (a signal still saves one)")
    p.add_argument("--keep", type=int, default=3, help="newest intact checkpoints kept")
    p.add_argument("--run-dir", default=str(HERE / "runs" / "latest"), help="one run's checkpoints and metrics")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint")
    p.add_argument("--resume-from", type=int, default=None, metavar="STEP",
                   help="continue from the checkpoint of this step (later ones are moved aside)")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --run-dir and start over")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a collective waits for the other ranks before the run stops")
    p.add_argument("--compile", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help="run the model under torch.compile; auto: on a GPU (not for pipeline stages), off on the CPU")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="--compile with each forward and backward replayed as a CUDA graph (mode reduce-overhead)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP when distributed")
    p.add_argument("--zero", action="store_true", help="shard the optimizer state over the data-parallel ranks "
                   "(ZeRO-1) when distributed")
    p.add_argument("--bias-fit", type=int, default=40, metavar="FORWARDS",
                   help="forwards a fresh run spends fitting the expert selection biases to a batch of its own data "
                        "before step 1 (not under a pipeline); 0: keep the compiled biases")
    p.add_argument("--bias-refit", type=int, default=12, metavar="ITERS",
                   help="iterations of each step's refit of the expert selection biases to the router scores of "
                        "its last micro-batch under the updated routers (the routers' inputs kept from its "
                        "forward, T x D a layer, scored again: no extra forward; not under a pipeline); 0: only "
                        "the --expert-bias-rate step")
    p.add_argument("--bias-refit-forward", action="store_true",
                   help="take the routers' inputs from one more forward of the step's last micro-batch under the "
                        "updated weights instead (no gradients; about a third of a micro-batch's forward and "
                        "backward a step)")
    p.add_argument("--seed", type=int, default=0, help="seeds dropout and the order of the batches")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where to train: a GPU when there is one (auto), or the one named")
    p.add_argument("--debug-nan-at-step", type=int, default=None,
                   help="testing aid: poison the loss with NaN at this step to exercise the stop path")
    p.add_argument("--debug-syncs", action="store_true",
                   help="testing aid: past the warm-up steps, a wait for the GPU in a step that logs nothing "
                        "is an error")
    p.add_argument("--debug-collectives", action="store_true",
                   help="testing aid: under torchrun, write the collectives and transfers each rank issued, in "
                        "order, to RUN_DIR/collectives/rank<N>.json")
    return p.parse_args()


def main(args):
    rt.check_flags(args)
    rt.weights.require_weights(HERE)  # before the model is allocated
    run_dir = Path(args.run_dir)
    env = rt.setup_distributed(args.seed, args.device, timeout_s=args.dist_timeout,
                               trace=run_dir / "collectives" if args.debug_collectives else None)
    build = rt.BuildInfo.read(HERE, Model, args.batch_size * args.grad_accum * env.world, args.seq_len)
    rt.check_world(build.options, env.world)  # the processes torchrun started fit the plan: before any work
    # the dense weights, and of the experts only those this rank holds, made from them (upcycle.json)
    model = rt.load_build(Model, HERE, env.device, *rt.local_experts(build.options, env.world, env.rank))
    before = rt.RunDir(run_dir, build.fingerprint, HERE).claim(args) if env.rank == 0 else {{}}
    data = rt.TokenData(rt.load_tokens(args.data, args.data_dtype), args.seq_len, args.val_fraction, args.seed)
    rt.check_vocab(data, build)
    def lm_loss(logits, targets):
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    # the build's plan (config.json): pipeline stages, EP, DDP or FSDP2, ZeRO; --fsdp and --zero add sharding
    parallel = rt.parallelize(model, env, build.options, fsdp=args.fsdp, zero=args.zero,
                              micro_batches=args.grad_accum, loss_fn=lm_loss, tp_plan=build.tp_plan)
    pipeline = parallel.pipeline  # None unless the build was compiled with --pp
    if pipeline is not None:
        pipeline.check_flags(args)  # what it does not carry out is refused now, not after training
    args.compile = rt.compiles(args, env.device, pipeline is not None)
    model = parallel.model
    if args.cuda_graphs:
        forward = torch.compile(model, mode="reduce-overhead")
    else:
        forward = torch.compile(model) if args.compile else model

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = parallel.optimizer(torch.optim.AdamW,  # with --zero, each rank keeps the state of a shard
                                   [{{"params": decay, "weight_decay": args.weight_decay}},
                                    {{"params": no_decay, "weight_decay": 0.0}}], lr=args.lr, betas=(0.9, 0.95),
                                   fused=env.device.type == "cuda",  # one kernel for every parameter
                                   foreach=env.device.type != "cuda")
    plan = build.options
    ckpt = rt.Checkpointer(run_dir / "checkpoints", args.keep, env.rank, parallel.mesh,
                           by_name=plan.ep > 1 or plan.pp > 1 or plan.tp > 1,  # resumable under another plan
                           fingerprint=build.fingerprint, tp_plan=build.tp_plan)
    start = rt.resume(ckpt, model, optimizer, args, before, env.rank)
    optimizer.param_groups[0]["weight_decay"] = args.weight_decay  # the flags given now, also on resume
    schedule = rt.warmup_cosine_scheduler(optimizer, args.warmup, args.steps, args.min_lr_ratio, start, args.lr)
    log = rt.RunLog(run_dir, args, build, env, start, resumed=start > 0, data_world=parallel.data_world)
    guard = rt.LossGuard(optimizer)  # a fused AdamW skips its update on a non-finite loss: read at log steps
    balance = rt.ExpertBias(rt.unwrap(model), build.router_biases, build.options.expert_bias_rate,  # --bias-refit:
                            build.options.topk * build.options.granularity, build.options.router, args.bias_refit)
    validate = args.val_fraction > 0

    def save(step):
        guard.read(ckpt)  # no weights of a diverged run are saved
        return ckpt.save(step, model, optimizer, {{"rng": rt.rng_state()}})

    def loss_of(inputs, targets):
        if args.cuda_graphs:  # the graphs' outputs of the call before are read by now
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(env.device.type, torch.bfloat16, enabled=env.device.type == "cuda"):
            out = forward(inputs)
        return lm_loss(out["logits"], targets), out

    if start == 0 and args.bias_fit and pipeline is None and balance.biases:  # a fresh run fits the selection
        batch = data.batch("train", -1, args.batch_size * args.grad_accum,  # biases to its data and length
                           parallel.data_rank, parallel.data_world, args.grad_accum)
        inputs, targets = (rt.to_device(t.chunk(args.grad_accum)[0], env.device) for t in batch)
        before, after = balance.calibrate(model, loss_of, inputs, targets, args.bias_fit)  # on a batch no step reads
        log.message(f"expert biases fitted to a batch: worst layer's load max/mean {{before:.2f}} -> {{after:.2f}}")

    with rt.StopOnSignal() as stop:
        for step in range(start, args.steps):
            log.begin(step + 1)
            optimizer.zero_grad(set_to_none=True)
            lm_sum = loss_sum = 0.0
            batch = data.batch("train", step, args.batch_size * args.grad_accum, parallel.data_rank,
                               parallel.data_world, args.grad_accum)  # micro-batches alike at any DP width
            if pipeline is not None:  # the schedule runs the micro-batches through the stages, forward and backward
                with torch.autocast(env.device.type, torch.bfloat16, enabled=env.device.type == "cuda"):
                    lm_sum, outs = pipeline.step(*(rt.to_device(t, env.device) for t in batch))
                for out in outs:  # every micro-batch's expert load and MoE losses, gathered over the stages
                    balance.add(out)
                    loss_sum = loss_sum + out.get("aux_loss", 0.0) + out.get("z_loss", 0.0)
                loss_sum = loss_sum + lm_sum
            else:
                for micro, (inputs, targets) in enumerate(zip(*(t.chunk(args.grad_accum) for t in batch))):
                    # gradients add up over the step's micro-batches
                    inputs, targets = rt.to_device(inputs, env.device), rt.to_device(targets, env.device)
                    lm, out = loss_of(inputs, targets)
                    loss = lm + out.get("aux_loss", 0.0) + out.get("z_loss", 0.0)  # MoE losses, already scaled
                    if step + 1 == args.debug_nan_at_step:
                        loss = loss * float("nan")
                    with parallel.accumulating(micro + 1 < args.grad_accum):
                        (loss / args.grad_accum).backward()
                    lm_sum, loss_sum = lm_sum + lm.detach(), loss_sum + loss.detach()
                    balance.add(out)  # every micro-batch's expert load
            guard.check(loss_sum, step + 1, ckpt, due=log.due(step + 1))  # before the weights change
            grad_norm = parallel.clip_grad_norm_(args.grad_clip or math.inf)  # the norm is logged either way
            optimizer.step()
            if args.bias_refit_forward:  # the layers below the routers have moved too (a pipeline refuses it)
                balance.rescore(model, loss_of, inputs, targets)
            balance.step()  # aux-loss-free balancing: the step's load, and its last router inputs scored by the
            # updated routers, set the biases
            schedule.step()
            log.step(step + 1, lm_sum / args.grad_accum, out, grad_norm, schedule.get_last_lr()[0])
            if validate and (args.eval_every and (step + 1) % args.eval_every == 0 or step + 1 == args.steps):
                model.eval()  # dropout off for the held-out loss
                # the same held-out batches under every plan; a pipeline passes each through its stages
                evaluate = pipeline.evaluate if pipeline is not None else lambda x, y: loss_of(x, y)[0]
                batches = (data.batch("val", i, args.batch_size, parallel.data_rank, parallel.data_world)
                           for i in range(args.eval_batches))
                with torch.no_grad(), torch.autocast(env.device.type, torch.bfloat16,
                                                     enabled=env.device.type == "cuda"):
                    losses = [evaluate(rt.to_device(x, env.device), rt.to_device(y, env.device)) for x, y in batches]
                log.validation(step + 1, losses)
                model.train()
            stopping = stop.requested()
            if stopping or args.ckpt_every > 0 and (step + 1) % args.ckpt_every == 0:
                log.message(f"checkpoint {{save(step + 1)}}")
            if stopping:
                log.message(f"stopped by {{stop.signal_name}} after step {{step + 1}}; resume with --resume")
                rt.teardown()
                return 128 + stop.signum
    if args.ckpt_every >= 0 and (ckpt.latest() is None or ckpt.latest().name != f"step_{{args.steps:08d}}"):
        save(args.steps)
    if parallel.expert_parallel:  # each rank holds a share of the model (experts, stages): the checkpoint has it all
        log.message(f"done: checkpoint {{ckpt.latest()}}, metrics in {{run_dir / 'metrics.jsonl'}}")
    else:
        rt.export_weights(model, run_dir / "final.safetensors", env)
        log.message(f"done: weights in {{run_dir / 'final.safetensors'}}, metrics in {{run_dir / 'metrics.jsonl'}}")
    rt.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(rt.run_main(main, parse_args()))
'''


SEQ_LEN = 128  # the --seq-len default, cut to the model's context when that is shorter


def write_train_program(build_dir: Path, config: dict) -> None:
    """Write build_dir/train.py for the build described by config (config.json's contents)."""
    o = config["options"]
    kind = "the dense model" if o["dense"] else f"the MoE model ({o['experts']} experts, top-{o['topk']})"
    title = f"{kind} built from {config['model']}"
    context = config["result"].get("context")
    seq_len = min(SEQ_LEN, context) if context else SEQ_LEN
    # the plan's micro-batches where a planner chose them, else the fewest a pipeline runs (DualPipeV: one a stage)
    schedule = o.get("pp_schedule", "1f1b")
    fewest = o.get("pp", 1) * (stages_per_rank(schedule) if schedule == "dualpipev" else 1)
    grad_accum = o.get("micro_batches") or fewest
    batch_size = o.get("micro_batch") or 16
    (Path(build_dir) / "train.py").write_text(TEMPLATE.format(title=title, seq_len=seq_len, grad_accum=grad_accum,
                                                              batch_size=batch_size))
