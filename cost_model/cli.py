"""The `moec plan` command.

`plan_command(provider)` builds `moec plan` around a function that turns the
MODEL argument (and --config, --seq-len) into a ModelShape; moec/driver/cli.py passes
the one that captures model.py. `plan` below is the stand-alone version: it
knows the models of known_models.py by name and reads ModelShape JSON files.
"""
import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Callable, Optional

import click

from moec.base.errors import MoecError
from moec.cost_model.explain import explain
from moec.cost_model.hardware import load_hardware
from moec.cost_model.known_models import KNOWN_MODELS
from moec.cost_model.planner import rank_plans
from moec.cost_model.report import LEGEND, table, write_plan_json
from moec.base.options import Options
from moec.cost_model.shape import ModelShape

ShapeProvider = Callable[[str, Optional[str], Optional[int]], ModelShape]


def known_or_json_shape(model: str, config: Optional[str], seq_len: Optional[int]) -> ModelShape:
    """A known model by name, or a JSON file with ModelShape's fields."""
    if model in KNOWN_MODELS:
        shape = KNOWN_MODELS[model].shape()
    elif model.endswith(".json") and Path(model).is_file():
        data = json.loads(Path(model).read_text())
        names = {f.name for f in fields(ModelShape)}
        if missing := {f.name for f in fields(ModelShape) if f.default is MISSING} - data.keys():
            raise MoecError(f"{model} lacks ModelShape fields {sorted(missing)}")
        if data.get("moe_layers") is not None:
            data["moe_layers"] = tuple(data["moe_layers"])
        shape = ModelShape(**{k: v for k, v in data.items() if k in names})
    else:
        raise MoecError(f"cannot read model dimensions from {model!r}; give a known model "
                        f"({', '.join(KNOWN_MODELS)}) or a JSON file with ModelShape's fields")
    if seq_len:
        shape = ModelShape(**{**shape.__dict__, "seq_len": seq_len})
    return shape


def _moe_options(model: str, experts, topk, granularity, shared, first_dense, every, max_nodes) -> Options:
    if experts is None:
        if model in KNOWN_MODELS:
            return KNOWN_MODELS[model].moe
        raise MoecError("--experts is required (and --topk): how many experts each MoE layer gets")
    if topk is None:
        raise MoecError("--topk is required with --experts: how many experts each token is routed to")
    return Options(experts=experts, topk=topk, granularity=granularity, shared_experts=shared,
                   first_dense=first_dense, moe_every=every, max_nodes_per_token=max_nodes).validate()


def plan_command(provider: ShapeProvider) -> click.Command:
    @click.command("plan")
    @click.argument("model")
    @click.option("--config", default=None, help="named config of the model file (e.g. 7b)")
    @click.option("--seq-len", type=int, default=None, help="training sequence length (default: the model's)")
    @click.option("--experts", type=int, default=None)
    @click.option("--topk", type=int, default=None)
    @click.option("--granularity", type=int, default=1, help="split each expert into this many narrower ones")
    @click.option("--shared-experts", type=int, default=0)
    @click.option("--first-dense", type=int, default=0, help="keep the first N FFNs dense")
    @click.option("--moe-every", type=int, default=1, help="make every N-th FFN an MoE layer")
    @click.option("--max-nodes-per-token", type=int, default=0, help="node-limited routing (0: no limit)")
    @click.option("--gpus", type=int, required=True)
    @click.option("--hardware", default="dgx_h100", help="built-in profile name or a JSON profile path")
    @click.option("--global-batch", type=int, default=0, help="sequences per step (default: ~4M tokens)")
    @click.option("--micro-batch", type=int, default=1)
    @click.option("--top", type=int, default=10, help="rows of the table")
    @click.option("--explain", "show_formulas", is_flag=True, help="print the formulas and the numbers substituted")
    @click.option("--latex", is_flag=True, help="with --explain: formulas as LaTeX")
    @click.option("-o", "--out", type=click.Path(file_okay=False), default=None, help="build dir for plan.json")
    def plan(model, config, seq_len, experts, topk, granularity, shared_experts, first_dense, moe_every,
             max_nodes_per_token, gpus, hardware, global_batch, micro_batch, top, show_formulas, latex, out):
        """Rank parallel plans for training MODEL as an MoE on GPUS GPUs of a hardware profile."""
        shape = provider(model, config, seq_len)
        moe = _moe_options(model, experts, topk, granularity, shared_experts, first_dense, moe_every,
                           max_nodes_per_token)
        hw = load_hardware(hardware)
        ranked, enumerated = rank_plans(shape, moe, gpus, hw, global_batch, micro_batch)
        click.echo(f"{shape.name} + MoE E={moe.experts} K={moe.topk} on {gpus} x {hw.gpu_name} ({hw.name}): "
                   f"{len(ranked)} of {enumerated} plans fit\n")
        runs = lambda plan: not any(moe.with_plan(plan).planner_problems())  # noqa: E731
        click.echo(table(ranked, top, runs))
        click.echo(f"\n{LEGEND}\ntrain.py: whether the emitted training program carries the plan out as predicted "
                   f"(`moec compile --gpus` chooses among those that it does)")
        click.echo(f"\nbest: {ranked[0].why}")
        if not runs(ranked[0]):
            best = next((p for p in ranked if runs(p)), None)
            click.echo(f"best that train.py runs: {best.why if best else 'none of those that fit'}")
        if show_formulas:
            click.echo("\n" + explain(ranked[0], shape, moe, hw, latex=latex))
        if out:
            click.echo(f"wrote {write_plan_json(out, ranked, enumerated, shape, moe)}")

    return plan


plan = plan_command(known_or_json_shape)
