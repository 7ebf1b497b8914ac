"""A training run's curves drawn with matplotlib: one titled panel per kind of series, against the step.

Losses are drawn on a log axis (they fall from a few units to 1e-5 in one run, which a linear axis flattens into
the floor), training and held-out losses share that axis and each task keeps one colour in every panel. Held-out
values are markers at the steps they were measured, joined by a line only once there are three or more, and every
legend sits beside its panel rather than over the data.

The held-out metrics panel shows the headline numbers only (`HEADLINE`: exact match, BLEU-4, top-1, R@1 and label
R@1, reply and judged accuracy), all between 0 and 1; median ranks (1 and up) get a log-scaled panel of their own.
The rest (token accuracy, BLEU-1..3, CIDEr-D, ROUGE-L, top-5, R@5/10, accuracy per class or question family, ...)
stays in metrics.csv and `mmfm eval`'s report, where it is readable, rather than as dozens of lines here.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from mmfm.eval.figures import legend_outside, new_figure, save_png

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Series = dict[str, list[tuple[int, float]]]

TRAIN_LOSS, VAL_LOSS, VAL_METRICS = "training loss", "held-out loss", "held-out metrics"
VAL_RANK = "held-out median rank"
# panel title -> y-axis label, in drawing order; any other series gets a panel of its own after these
PANELS = {
    TRAIN_LOSS: "loss",
    VAL_LOSS: "loss",
    VAL_METRICS: "value",
    VAL_RANK: "rank (1 = best)",
    "learning rate": "learning rate",
    "throughput": "samples / s",
}
LINE_MIN_POINTS = 3  # held-out values are joined by a line from this many points on; fewer are markers alone
MARKERS = "osD^vP*Xph<>"
# the held-out metrics drawn (keys after "val/<task>/"); the others are left out of the curves
HEADLINE = re.compile(r"exact_match|bleu_4|top1|(label_)?r1_.+|reply_accuracy|judged_accuracy")


def panel_of(name: str) -> str | None:
    """The panel a series goes to: training or held-out loss, held-out metrics (`HEADLINE` ones), held-out median
    rank, learning rate, throughput or its own (named after the series); None for a held-out metric left out."""
    if name.endswith("/loss"):
        return TRAIN_LOSS if name.startswith("train/") else VAL_LOSS
    if name.startswith("val/"):
        key = name.split("/", 2)[-1]
        if key.startswith("median_rank_"):
            return VAL_RANK
        return VAL_METRICS if HEADLINE.fullmatch(key) else None
    last = name.rpartition("/")[2]
    return {"lr": "learning rate", "samples_per_s": "throughput"}.get(last, name)


def plot_curves(series: Series, path: str | Path) -> Path:
    """Writes the curves of `series` to a PNG at `path` (see `curves_figure`) and returns the path."""
    return save_png(curves_figure(series), path)


def curves_figure(series: Series) -> Figure:
    """The figure `plot_curves` writes: a grid of panels, two to a row, sharing the step axis.

    Args:
        series: {name: [(step, value), ...]} as a run's metrics.csv holds them: "train/<task>/loss",
            "val/<task>/loss", "val/<task>/<metric>", "train/lr", "train/samples_per_s". Empty series, points
            that are not finite (a diverged loss) and held-out metrics that are not headline numbers (see the
            module docstring) are left out; with nothing left the figure says so.

    Returns:
        The figure; its axes carry the panel titles (`ax.get_title()`).
    """
    panels: dict[str, Series] = {}
    for name, points in sorted(series.items()):
        points = [(step, value) for step, value in points if math.isfinite(value)]
        panel = panel_of(name)
        if points and panel is not None:
            panels.setdefault(panel, {})[name] = points
    if not panels:
        figure = new_figure(6.0, 2.0)
        figure.text(0.5, 0.5, "no metrics logged yet", ha="center", va="center")
        return figure
    order = [p for p in PANELS if p in panels] + sorted(p for p in panels if p not in PANELS)
    tasks = sorted({_task(name) for lines in panels.values() for name in lines})
    colors = dict(zip(tasks, _palette(len(tasks)), strict=True))

    columns = min(2, len(order))
    rows = math.ceil(len(order) / columns)
    figure = new_figure(7.5 * columns, 3.6 * rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(order) :]:
        ax.set_visible(False)
    last_step = max(step for lines in panels.values() for points in lines.values() for step, _ in points)
    for ax, title in zip(axes, order, strict=False):
        lines = panels[title]
        held_out = title in (VAL_LOSS, VAL_METRICS, VAL_RANK)
        metric_markers = _metric_markers(lines) if title in (VAL_METRICS, VAL_RANK) else {}
        for name, points in lines.items():
            steps, values = zip(*points, strict=True)
            if held_out:
                marker = metric_markers.get(name, "o")
                style = "-" if len(points) >= LINE_MIN_POINTS else "none"
            else:
                marker, style = ("o" if len(points) == 1 else None), "-"
            ax.plot(
                steps,
                values,
                marker=marker,
                linestyle=style,
                color=colors[_task(name)],
                label=_label(name, title),
            )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(PANELS.get(title, title.rpartition("/")[2]))
        ax.set_xlim(0, last_step * 1.04 or 1)  # room for a marker on the last step
        ax.grid(alpha=0.3)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if title == VAL_RANK:  # ranks fall from tens (or thousands) to 1: a log axis keeps the last steps apart
            _plain_log_axis(ax)
        if len(lines) > 1 or title in (TRAIN_LOSS, VAL_LOSS, VAL_METRICS, VAL_RANK):
            legend_outside(ax, columns=2 if len(lines) > 12 else 1)
    _loss_axes(figure, [ax for ax, title in zip(axes, order, strict=False) if title in (TRAIN_LOSS, VAL_LOSS)])
    return figure


def _loss_axes(figure: Figure, axes: list[Axes]) -> None:
    """One y scale for both loss panels: log when every loss is positive, symmetric log around zero when some are
    not (a loss of exactly 0, or an objective that goes negative), linear when none is."""
    if not axes:
        return
    values = [v for ax in axes for line in ax.get_lines() for v in line.get_ydata()]
    nonzero = [abs(v) for v in values if v != 0]
    for ax in axes[1:]:
        ax.sharey(axes[0])
    if all(v > 0 for v in values):
        axes[0].set_yscale("log")
    elif nonzero:
        axes[0].set_yscale("symlog", linthresh=min(nonzero))


def _plain_log_axis(ax: Axes) -> None:
    """A log y axis whose ticks read as plain numbers (20, 30, 50, 100), not 2 x 10^1."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _task(name: str) -> str:
    """The task a series belongs to ("val/image_caption/exact_match" -> "image_caption"); else the name."""
    parts = name.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] in ("train", "val") else name


def _label(name: str, panel: str) -> str:
    """A series' legend entry: the task for losses, task and metric for held-out metrics, else the name."""
    if panel in (TRAIN_LOSS, VAL_LOSS):
        return _task(name)
    if panel in (VAL_METRICS, VAL_RANK):
        return name.removeprefix("val/")
    return name


def _metric_markers(lines: Series) -> dict[str, str]:
    """A marker shape per metric ("accuracy", "exact_match", ...), so that a task's metrics, which share its
    colour, stay apart."""
    metrics = sorted({name.split("/", 2)[-1] for name in lines})
    shape = {metric: MARKERS[i % len(MARKERS)] for i, metric in enumerate(metrics)}
    return {name: shape[name.split("/", 2)[-1]] for name in lines}


def _palette(count: int) -> list:
    """`count` distinct colours: matplotlib's tab10, or tab20 past ten."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]
