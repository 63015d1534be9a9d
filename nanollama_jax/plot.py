"""Plot a run's curves (training and validation loss, bits per byte, task accuracy when the run
scored tasks, learning rate) as a PNG.

    python -m nanollama_jax.plot runs/tiny            # writes runs/tiny/curves.png
"""
from __future__ import annotations

from pathlib import Path

from nanollama_base.files import atomic_path

from . import metrics


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics yet (has the run logged a step?)")
    return metrics.read_metrics(path)


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    from matplotlib.figure import Figure  # no pyplot: safe from the training loop's background thread

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    scored = [r for r in rows if "tasks" in r]
    panels = 4 if scored else 3
    fig = Figure(figsize=(5 * panels, 4))
    axes = fig.subplots(1, panels)
    ax_loss, ax_bpb, ax_lr = axes[0], axes[1], axes[-1]
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        best = min(val, key=lambda r: r["val_loss"])  # the step runs/<tag>/best holds
        ax_loss.plot(best["step"], best["val_loss"], "*", ms=14, color="tab:red", label=f"best (step {best['step']})")
        ax_bpb.plot([r["step"] for r in val], [r["val_bpb"] for r in val], "o-", color="tab:green")
    ax_loss.set(title="loss (nats/token)", xlabel="step")
    ax_loss.legend()
    ax_bpb.set(title="validation bits per byte", xlabel="step")
    if scored:
        plot_tasks(axes[2], scored)
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:red")
    ax_lr.set(title="learning rate (hidden matrices)", xlabel="step")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    output = Path(output) if output else run_dir / "curves.png"
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return output


LEGEND_TASKS = 10  # beyond this many tasks (CORE has 22) a legend would hide the curves


def plot_tasks(ax, scored: list[dict]) -> None:
    """Each task's accuracy (thin lines, named when few) and the mean centred accuracy, per evaluation."""
    steps = [r["step"] for r in scored]
    labels = list(scored[-1]["tasks"])
    for label in labels:
        ax.plot(steps, [r["tasks"].get(label, {}).get("accuracy", float("nan")) for r in scored], lw=1,
                alpha=0.6, label=label if len(labels) <= LEGEND_TASKS else None)
    ax.plot(steps, [r["centred_mean"] for r in scored], "o-", color="black", label="mean centred accuracy")
    ax.set(title=f"task accuracy ({len(labels)} tasks)", xlabel="step")
    ax.legend(fontsize="small")


class PlotRefresher:
    """Redraws a run's curves in a background thread (training does not wait for matplotlib):
    `refresh()` at each evaluation, `close()` on exit draws the final state. A refresh asked for
    while one is still waiting to start is the same refresh."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, warn=print):
        import concurrent.futures

        self.run_dir, self.enabled, self.warn = Path(run_dir), enabled, warn
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="plot") if enabled else None
        self.pending = None

    def _draw(self) -> None:
        try:
            plot_run(self.run_dir)
        except Exception as e:  # a plot is a view of the metrics: never a reason to stop training
            if self.warn:
                self.warn(f"{self.run_dir / 'curves.png'}: not refreshed ({type(e).__name__}: {e})")
                self.warn = None  # once is enough

    def refresh(self) -> None:
        if self.enabled and (self.pending is None or self.pending.running() or self.pending.done()):
            self.pending = self.pool.submit(self._draw)

    def close(self) -> None:
        if self.enabled:
            self.pool.shutdown(wait=True)
            if (self.run_dir / "metrics.jsonl").is_file():
                self._draw()


def main(argv=None):
    from nanollama_base.cli import ArgumentParser, run_cli

    p = ArgumentParser(prog="python -m nanollama_jax.plot", description=__doc__)
    p.add_argument("run", help="run folder")
    p.add_argument("--output", help="PNG path (default RUN/curves.png)")
    args = p.parse_args(argv)
    run_cli(p.prog, lambda: print(f"wrote {plot_run(args.run, args.output)}"))


if __name__ == "__main__":
    main()
