"""The report's plots (matplotlib, Agg): cost vs metric scatter plots and loss curves, as PNG and SVG.

Direction is handled the same way in every plot: better is always up. A lower-is-better metric (perplexity) gets an
inverted y axis and says so in its label; costs (time, memory, trainable parameters) grow to the right.
"""

from __future__ import annotations

from pathlib import Path

from peftlab.record import RunRecord
from peftlab.report.tables import Column, ConfigGroup, TaskTable

SCATTERS = {  # kind -> (column key or params, x label, log x)
    "speed": ("time_per_epoch_min", "Time/Epoch (min) → slower", False),
    "memory": ("memory_gb", "Memory (GB) → more", False),
    "params": ("trainable_params", "Trainable parameters (log scale) → more", True),
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
SEED_STYLES = ("-", "--", ":", "-.")  # the seeds of one config: one colour, a line style each


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "peftlab", "font.size": 9})
    return plt


def _save(fig, folder: Path, stem: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    png, svg = folder / f"{stem}.png", folder / f"{stem}.svg"
    fig.savefig(png, dpi=120, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(svg, bbox_inches="tight", metadata={"Date": None})
    return png, svg


def metric_axis(ax, table: TaskTable, values: list[float]) -> None:
    """Label the y axis with the metric and its direction; invert it for lower-is-better metrics."""
    column = table.metric_column
    if not table.higher_is_better:
        positive = [v for v in values if v > 0]
        if positive and len(positive) == len(values) and max(positive) / min(positive) > 20:
            ax.set_yscale("log")
        ax.invert_yaxis()
        ax.set_ylabel(f"{column.header}\n(lower is better; axis inverted: better is up)")
    else:
        ax.set_ylabel(f"{column.header}\n(higher is better)")


def _trainable_params(record: RunRecord) -> float | None:
    value = record.params.trainable_params
    return float(value) if isinstance(value, int | float) and value > 0 else None


def metric_error(group: ConfigGroup, y: float, std: float | None) -> list | None:
    """The metric's error bar: the row's 95% bootstrap CI where it has one, else ± std over seeds."""
    ci = group.stats.ci
    if ci is not None:
        return [[max(y - ci.lo, 0.0)], [max(ci.hi - y, 0.0)]]
    return [std] if std else None


def scatter(table: TaskTable, kind: str, folder: Path) -> tuple[Path, Path]:
    """One point per config (seed mean), labelled, coloured by model; the metric's error bar is its 95% bootstrap CI
    (± std over seeds without per-example values), the cost's ± std over seeds."""
    plt = _pyplot()
    key, xlabel, logx = SCATTERS[kind]
    xcol = (Column("trainable_params", "Trainable parameters", _trainable_params, str) if key == "trainable_params"
            else next(c for c in table.columns if c.key == key))
    ycol: Column = table.metric_column
    models = sorted({str(g.first.model.name) for g in table.groups})
    methods = sorted({str(g.first.method.name) for g in table.groups})
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    ys = []
    for group in table.groups:
        (x, xs), (y, ysd) = group.mean_std(xcol), group.mean_std(ycol)
        if x is None or y is None:
            continue
        ys.append(y)
        color = f"C{models.index(str(group.first.model.name)) % 10}"
        marker = MARKERS[methods.index(str(group.first.method.name)) % len(MARKERS)]
        ax.errorbar([x], [y], xerr=[xs] if xs else None, yerr=metric_error(group, y, ysd), fmt=marker,
                    color=color, markersize=7, capsize=3)
        ax.annotate(group.label(table.several_models), (x, y), textcoords="offset points", xytext=(6, 5),
                    fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    metric_axis(ax, table, ys)
    ax.set_title(f"{table.title}: {xcol.label} vs {ycol.label} (better: up, cheaper: left)\n"
                 "error bars: 95% bootstrap CI over evaluation examples (else ± std over seeds)", fontsize=9)
    for i, model in enumerate(models):
        ax.plot([], [], "o", color=f"C{i % 10}", label=model)
    if len(models) > 1 or len(table.groups) > 1:
        ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.12)
    paths = _save(fig, folder, f"{table.slug}-{kind}")
    plt.close(fig)
    return paths


def loss_curves(table: TaskTable, folder: Path) -> tuple[Path, Path]:
    """Training loss per optimizer step of every run (x: epochs), one line per run, seeds of a config share a colour."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for i, group in enumerate(table.groups):
        for j, run in enumerate(group.runs):
            rows = [r for r in run.history() if isinstance(r.get("loss"), int | float)]
            if not rows:
                continue
            xs = [r.get("epoch", r.get("step")) for r in rows]
            ax.plot(xs, [r["loss"] for r in rows], color=f"C{i % 10}", alpha=0.9 if j == 0 else 0.6,
                    linestyle=SEED_STYLES[j % len(SEED_STYLES)], marker="." if len(rows) < 30 else None,
                    label=f"{group.label(table.several_models)}" + (f" seed {run.config.get('seed')}"
                                                                     if len(group.runs) > 1 else ""))
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Training loss ↓ (lower is better)")
    ax.set_title(f"{table.title}: training loss per run")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    paths = _save(fig, folder, f"{table.slug}-loss")
    plt.close(fig)
    return paths


def plot_table(table: TaskTable, folder: Path) -> dict[str, tuple[Path, Path]]:
    """The four plots of one task table: speed, memory, params (each vs the metric) and loss curves; no speed plot
    where the table's speed columns are blank (its runs span machines)."""
    blank = {c.key for c in table.blanked}
    plots = {kind: scatter(table, kind, folder) for kind, (key, _label, _log) in SCATTERS.items() if key not in blank}
    plots["loss"] = loss_curves(table, folder)
    return plots
