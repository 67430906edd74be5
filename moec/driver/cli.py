"""The `moec` command line. User errors print one line and exit 2; every command's --debug shows tracebacks."""
import ast
import json
from pathlib import Path

import click

from moec.base.errors import MoecError
from moec.base.options import (AUX_LOSS_SCOPES, EP_VARIANTS, PLAN_FIELDS, PP_SCHEDULES, ROUTER_INITS, ROUTER_WEIGHTS,
                               ROUTERS, ROUTINGS, Options)
from moec.driver.export_formats import FORMATS


def _set_debug(ctx, _param, value):
    if value:
        ctx.meta["moec.debug"] = True


DEBUG = dict(is_flag=True, expose_value=False, callback=_set_debug, help="Show tracebacks.")


class MoecGroup(click.Group):
    def add_command(self, cmd, name=None):
        cmd.params.append(click.Option(["--debug"], **DEBUG))  # every command, wherever it is defined
        super().add_command(cmd, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as e:
            if ctx.meta.get("moec.debug"):
                raise
            if isinstance(e, MoecError):
                click.echo(f"error: {e}", err=True)
                ctx.exit(2)
            click.echo(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
            ctx.exit(1)


@click.group(cls=MoecGroup)
@click.version_option(package_name="moec")
def main():
    """moec: compile a dense PyTorch transformer into a Mixture-of-Experts training program."""


def _overrides(pairs) -> dict:
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise MoecError(f"--set {pair}: expected KEY=VALUE, e.g. --set n_layers=8")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def _layer_list(flag: str, value) -> tuple:
    if value is None:
        return ()
    parts = value.split(",")
    if not all(p.strip().isdigit() for p in parts):
        raise MoecError(f"{flag} {value}: expected MoE layer numbers separated by commas, e.g. 0,1")
    return tuple(int(p) for p in parts)


def _pyramid(value):
    if value is None:
        return None
    experts, sep, layers = value.partition(":")
    if not sep or not experts.isdigit() or not layers.isdigit() or int(layers) < 1:
        raise MoecError(f"--pyramid {value}: expected EXPERTS:LAYERS, e.g. 16:2 (the last 2 MoE layers get 16)")
    return int(experts), int(layers)


@main.command("compile")
@click.argument("model", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="Build directory to write.")
@click.option("--entry", default="build_model", show_default=True, help="Factory function in the model file.")
@click.option("--config", default=None, help="Named configuration passed to the factory (e.g. 7b).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Factory keyword override; repeatable.")
@click.option("--experts", default=8, show_default=True, help="Experts per MoE layer (before --granularity).")
@click.option("--topk", default=2, show_default=True, help="Experts each token is routed to (before --granularity).")
@click.option("--router", type=click.Choice(ROUTERS), default="softmax", show_default=True)
@click.option("--routing", type=click.Choice(ROUTINGS), default="topk", show_default=True,
              help="Each token picks its top-k experts, or each expert picks its top tokens of the batch "
                   "(expert-choice: it reads later tokens of a sequence; see the README).")
@click.option("--hash-layers", default=None, metavar="I,J,...",
              help="MoE layers (0-based) routed by a fixed token-id -> experts table, balanced over the "
                   "calibration text's token frequencies (Hash Layers).")
@click.option("--router-init", type=click.Choice(ROUTER_INITS), default="centered", show_default=True,
              help="Router rows: random, random with the mean FFN input projected out (centered), or k-means "
                   "centroids of the FFN inputs (kmeans); the last two read calibration tokens.")
@click.option("--calibration-data", default=None, type=click.Path(),
              help="Text or .bin of token ids for --router-init [the embedded text].")
@click.option("--shared-experts", default=0, show_default=True, help="Always-on experts, each F/granularity wide.")
@click.option("--granularity", default=1, show_default=True,
              help="Split each expert into M finer ones: E*M experts of width F/M, top K*M.")
@click.option("--moe-every", default=1, show_default=True, help="Make every N-th FFN an MoE layer.")
@click.option("--first-dense", default=0, show_default=True, help="Keep the first K FFNs dense.")
@click.option("--pyramid", default=None, metavar="EXPERTS:LAYERS",
              help="Give the last LAYERS MoE layers EXPERTS experts (PR-MoE).")
@click.option("--upcycle-noise", default=0.0, show_default=True, help="Gaussian noise (x weight std) on experts.")
@click.option("--capacity-factor", default=0.0, show_default=True, help="0 = dropless.")
@click.option("--router-weights", type=click.Choice(ROUTER_WEIGHTS), default="renorm", show_default=True,
              help="Gate weights: the top-k scores over their sum (renorm), or the softmax scores of the chosen "
                   "experts times E/K, not renormalised (scaled).")
@click.option("--drop-upcycle", default=0.0, show_default=True,
              help="Re-initialise this share of each expert's FFN units (a different share per expert).")
@click.option("--aux-loss", default=0.01, show_default=True, help="Load-balancing loss coefficient.")
@click.option("--aux-loss-scope", type=click.Choice(AUX_LOSS_SCOPES), default="batch", show_default=True,
              help="Balance the load over the batch, or within each sequence (the loss averaged over sequences).")
@click.option("--z-loss", default=0.001, show_default=True, help="Router z-loss coefficient.")
@click.option("--expert-bias-rate", default=1e-3, show_default=True,
              help="Aux-loss-free balancing: each optimizer step moves a per-expert selection bias by this much "
                   "toward the even load, then refits it to the step's last micro-batch as the updated routers "
                   "score it (train.py --bias-refit; 0: off; top-k layers only).")
@click.option("--force-balance", is_flag=True,
              help="Benchmarking aid: deal tokens to experts round-robin, whatever the router says.")
@click.option("--recompute-experts", is_flag=True,
              help="Recompute the experts' [T*K, F] activations in backward instead of storing them.")
@click.option("--weights", default=None, type=click.Path(),
              help="Dense weights to upcycle: safetensors, .pt, or a Hugging Face directory or its index json.")
@click.option("--seed", default=0, show_default=True)
@click.option("--max-weights-gb", default=4.0, show_default=True,
              help="Write the dense weights (the build's weights.safetensors) only up to this size.")
@click.option("--reference-weights", is_flag=True,
              help="Let the build name the dense checkpoint's safetensors files, with their SHA-256, instead of "
                   "copying their tensors; each rank reads them there and checks the sums.")
@click.option("--gpus", default=0, help="Let the planner pick the parallel plan for this many GPUs (plan.json).")
@click.option("--hardware", default=None, help="Hardware profile name or JSON for --gpus [dgx_h100].")
@click.option("--ep", default=1, show_default=True,
              help="Expert-parallel degree: shard the experts over N ranks (all-to-all).")
@click.option("--ep-variant", type=click.Choice(EP_VARIANTS), default="flat", show_default=True,
              help="hierarchical: all-to-all inside each node, then between nodes; rbd: each token crosses to a "
                   "node once (both need --node-size; with --ep).")
@click.option("--node-size", default=0, help="Ranks per node, for --ep-variant hierarchical or rbd.")
@click.option("--ep-chunks", default=1, show_default=True,
              help="Overlap the all-to-all of one chunk of experts with another's compute (flat EP).")
@click.option("--pp", default=1, show_default=True, help="Pipeline stages: split the layers over N ranks.")
@click.option("--pp-schedule", type=click.Choice(PP_SCHEDULES), default="1f1b", show_default=True,
              help="Pipeline schedule (torch.distributed.pipelining); interleaved-1f1b, zero-bubble and dualpipev "
                   "run two stages per rank.")
@click.option("--tp", default=1, show_default=True, help="Tensor-parallel degree.")
@click.option("--sequence-parallel", is_flag=True,
              help="With --tp N: between attention and FFN regions each TP rank holds 1/N of each sequence's "
                   "tokens (norms, router, MoE run on them; Megatron's --sequence-parallel).")
@click.option("--zero", default=0, show_default=True,
              help="ZeRO stage: 1 shards the optimizer state over the data-parallel ranks, 3 is FSDP2.")
@click.option("--recompute", is_flag=True,
              help="Whole-layer activation recomputation: each layer keeps only its input for backward and runs "
                   "its forward again there (activation checkpointing; model.py's RECOMPUTE).")
@click.option("--plan", "plan_file", default=None, type=click.Path(),
              help="Take the parallel plan from a plan.json (`moec plan -o` or a --gpus build writes one).")
@click.option("--no-triton", is_flag=True, help="Keep the torch reference routing ops (no generated kernels).")
@click.option("--dense", is_flag=True, help="Keep the model dense (a baseline to compare the MoE against).")
@click.option("--no-verify", is_flag=True, help="Skip the dense-vs-upcycled output check.")
@click.option("--stop-after", default=None, metavar="PASS",
              help="Run the pipeline up to this pass and write only ir/ and config.json.")
@click.option("--force", is_flag=True, help="Replace a build moec wrote there before (its runs/ are kept).")
def compile_cmd(model, out, sets, pyramid, hash_layers, no_triton, no_verify, stop_after, force, plan_file,
                **chosen):
    """Compile MODEL (a .py file with a model factory, or a Hugging Face checkpoint directory) into an MoE
    training program."""
    from moec.driver.compiler import compile_model

    options = Options(**chosen, overrides=_overrides(sets), pyramid=_pyramid(pyramid), triton=not no_triton,
                      hash_layers=_layer_list("--hash-layers", hash_layers), verify=not no_verify)
    if plan_file is not None:
        options = options.with_plan(_read_plan(plan_file, options))
    compile_model(model, out, options.validate(), force=force, stop_after=stop_after, log=click.echo)


def _read_plan(path: str, given: Options) -> dict:
    """plan.json's chosen plan (the file `moec plan -o` and `moec compile --gpus` write), or a JSON object of
    plan fields (ep, dp, tp, pp, zero, recompute, micro_batch, micro_batches; the ones left out keep their
    defaults)."""
    default = Options()
    flags = [f"--{k}" for k in ("gpus", *PLAN_FIELDS) if getattr(given, k) != getattr(default, k)]
    if flags:
        raise MoecError(f"--plan {path} gives the parallel plan: drop {', '.join(flags)}")
    try:
        record = json.loads(Path(path).read_text())
    except OSError as e:
        raise MoecError(f"--plan {path}: {e.strerror.lower()}") from e
    except ValueError as e:
        raise MoecError(f"--plan {path}: not JSON ({e})") from e
    record = record.get("chosen", record) if isinstance(record, dict) else None
    if not isinstance(record, dict) or not all(isinstance(record.get(k, 0), int) for k in PLAN_FIELDS):
        raise MoecError(f"--plan {path}: expected plan.json, or an object of {', '.join(PLAN_FIELDS)} (integers)")
    return record


@main.command("ir")
@click.argument("build_dir", type=click.Path())
@click.option("--pass", "pass_name", default=None, help="Show this pass's graph after it ran.")
@click.option("--diff", is_flag=True, help="With --pass: show what the pass changed instead.")
def ir_cmd(build_dir, pass_name, diff):
    """Summarise the passes of a build, or show one pass's IR."""
    ir = Path(build_dir) / "ir"
    if not (ir / "summary.json").is_file():
        raise MoecError(f"{build_dir}: no ir/summary.json; is this a directory written by `moec compile`?")
    rows = json.loads((ir / "summary.json").read_text())
    if pass_name is None:
        if diff:
            raise MoecError("--diff needs --pass NAME")
        table = [("#", "pass", "nodes", "params", "active/token", "MoE layers", "changed")]
        table += [(f"{i:02d}", r["pass"], str(r["nodes"]), f"{r['params']:,}", f"{r['active_params']:,}",
                   str(r["moe_layers"]), "yes" if r["modified"] else "no") for i, r in enumerate(rows)]
        widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
        for row in table:  # two spaces between columns however wide the numbers get; names and yes/no left
            click.echo("  ".join(cell.ljust(w) if c in (1, 6) else cell.rjust(w)
                                 for c, (cell, w) in enumerate(zip(row, widths))).rstrip())
        return
    names = [r["pass"] for r in rows]
    if pass_name not in names:
        raise MoecError(f"no pass '{pass_name}' in this build; passes: {', '.join(names)}")
    i = names.index(pass_name)
    path = ir / (f"{i:02d}_{pass_name}.diff" if diff and i else f"{i:02d}_{pass_name}.py")
    click.echo(path.read_text(), nl=False)


@main.command("export")
@click.argument("source", type=click.Path())
@click.option("--format", "format_name", required=True, type=click.Choice(list(FORMATS)),
              help="The Hugging Face MoE family to write.")
@click.option("-o", "--out", required=True, type=click.Path(), help="Directory to write the checkpoint into.")
@click.option("--step", default=None, type=int, help="Export this checkpoint of the run [the newest weights].")
@click.option("--drop-bias", is_flag=True,
              help="Leave out the aux-loss-free selection biases, which the format cannot hold (routing changes).")
@click.option("--force", is_flag=True, help="Replace an export moec wrote there before.")
def export_cmd(source, format_name, out, step, drop_bias, force):
    """Write SOURCE (a build, a run dir or one of its checkpoints) as a Hugging Face MoE checkpoint."""
    from moec.driver.export import export

    export(source, format_name, out, force=force, drop_bias=drop_bias, step=step, log=click.echo)


def _commands_beside_their_subsystems():
    from moec.codegen.report import kernels
    from moec.cost_model.cli import plan_command
    from moec.driver.calibrate import calibrate
    from moec.driver.model_shape import shape_from_model
    from moec.runtime.training.plot import plot

    for command in (kernels, plan_command(shape_from_model), calibrate, plot):
        main.add_command(command)


_commands_beside_their_subsystems()

if __name__ == "__main__":
    main()
