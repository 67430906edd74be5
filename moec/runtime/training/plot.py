"""`moec plot RUN_DIR`: loss and expert-load curves of a training run, from its metrics.jsonl, to a PNG."""
from pathlib import Path

import click

from moec.base.errors import MoecError
from moec.runtime.training.progress import read_metrics


def plot_run(run_dir: Path, out: Path) -> Path:
    try:
        import matplotlib
    except ImportError as e:
        raise MoecError("moec plot needs matplotlib: pip install 'moec[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise MoecError(f"{run_dir}: no metrics.jsonl; is this a run directory written by train.py?")
    records = read_metrics(path)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    if not train and not val:
        raise MoecError(f"{path} holds no records yet; plot it after the first --log-every steps")
    layers = len(train[-1]["expert_load"]) if train else 0
    dropping = any(layer["dropped"] > 0 for r in train for layer in r["expert_load"])
    panels = 1 + 2 * (layers > 0) + dropping
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["lm_loss"] for r in train], label="train LM loss")
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    if layers:
        ax = axes[0][1]
        for i in range(layers):  # max/mean = 1 is perfect balance
            ax.plot([r["step"] for r in train],
                    [r["expert_load"][i]["max"] / max(r["expert_load"][i]["mean"], 1e-9) for r in train],
                    label=f"layer {i}")
        ax.set(xlabel="step", ylabel="max / mean tokens per expert", title="expert load")
        ax.legend(fontsize="small", ncol=2)
    if layers:  # every layer at once: which ones stay uneven, and when
        ax = axes[0][2]
        cv = [[r["expert_load"][i].get("cv", float("nan")) for r in train] for i in range(layers)]
        steps = [r["step"] for r in train]
        image = ax.imshow(cv, aspect="auto", origin="lower", cmap="viridis", vmin=0, interpolation="nearest",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, layers - 0.5))
        fig.colorbar(image, ax=ax, label="coefficient of variation of tokens per expert")
        ax.set(xlabel="step", ylabel="MoE layer", title="expert load by layer")
    if dropping:
        ax = axes[0][3]
        for i in range(layers):
            ax.plot([r["step"] for r in train], [r["expert_load"][i]["dropped"] for r in train], label=f"layer {i}")
        ax.set(xlabel="step", ylabel="share of slots dropped", title="dropped tokens")
        ax.legend(fontsize="small", ncol=2)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


@click.command("plot")
@click.argument("run_dir", type=click.Path())
@click.option("-o", "--out", default=None, type=click.Path(), help="PNG to write [RUN_DIR/metrics.png].")
def plot(run_dir, out):
    """Draw the loss and expert-load curves of a train.py run directory to a PNG."""
    written = plot_run(Path(run_dir), Path(out) if out else Path(run_dir) / "metrics.png")
    click.echo(f"wrote {written}")
