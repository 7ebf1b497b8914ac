"""Evaluation figures drawn with matplotlib: a confusion matrix, recall@k curves, grouped bars and a grid of
generated samples with the judge's verdicts.

Each function draws on its own `matplotlib.figure.Figure` with an Agg canvas (no pyplot state, so threads may
draw at once), writes a PNG and returns its path. matplotlib is imported when a figure is drawn, not when this
module is.

```python
from mmfm.eval.figures import bar_figure, confusion_figure, recall_figure, sample_grid_figure

confusion_figure(confusion_matrix(predicted, labels, 10), [str(d) for d in range(10)], "confusion.png")
recall_figure({"image_to_text": {1: 0.62, 5: 0.91, 10: 0.97}, "text_to_image": {1: 0.58, 5: 0.9, 10: 0.96}}, "r.png")
bar_figure({"run_a": {"count": 0.9, "colour": 0.7}, "run_b": {"count": 0.95}}, "qa.png", "QA", "accuracy")
sample_grid_figure(images, ["the digit 7"] * 8, [True, False, ...], "samples.png")
```
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from mmfm.errors import InputError
from mmfm.text_generation import finite_number

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
RIGHT, WRONG = "#2ca02c", "#d62728"  # the judge's verdict colours
ANNOTATE_MAX_CLASSES = 20  # a confusion matrix up to this size has each cell's count written in it
TICK_LABELS_MAX_CLASSES = 60  # beyond this, class names would overlap: the axes show none


def new_figure(width: float, height: float) -> Figure:
    """An empty figure of `width` x `height` inches on its own Agg canvas, laid out by constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: str | Path) -> Path:
    """Writes `figure` to `path` as a PNG (whatever the suffix) and returns the path."""
    path = Path(path)
    figure.savefig(path, format="png", dpi=DPI)
    return path


def confusion_figure(matrix: Any, class_names: Sequence[str], path: str | Path, title: str | None = None) -> Path:
    """Draws a confusion matrix: rows are true classes, columns predicted ones.

    Each cell is coloured by its share of the row (so a rare class reads as clearly as a common one) and, up to
    `ANNOTATE_MAX_CLASSES` classes, holds its count.

    Args:
        matrix: (C, C) counts, a tensor, array or nested lists, as `mmfm.eval.classification.confusion_matrix`
            returns them.
        class_names: the C class names, in the matrix's order.
        path: where to write the PNG.
        title: drawn above the matrix; "confusion matrix" when None.

    Returns:
        The path written.

    Raises:
        InputError: the matrix is empty, not square, not made of finite non-negative numbers, or its size is not
            the number of class names.
    """
    counts = _number_array(matrix, "matrix")
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise InputError(f"matrix has shape {tuple(counts.shape)}: a confusion matrix is square (C, C)")
    num_classes = counts.shape[0]
    if num_classes == 0:
        raise InputError("matrix is empty: a confusion matrix needs at least one class")
    if len(class_names) != num_classes:
        raise InputError(f"matrix is {num_classes} x {num_classes} but there are {len(class_names)} class names")
    if (counts < 0).any():
        raise InputError("matrix holds negative counts")
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)

    side = min(4.0 + 0.4 * num_classes, 24.0)
    figure = new_figure(side + 1.5, side)
    ax = figure.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    ax.set_title(title or "confusion matrix")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if num_classes <= TICK_LABELS_MAX_CLASSES:
        ticks = range(num_classes)
        ax.set_xticks(ticks, [str(n) for n in class_names], rotation=45 if _longest(class_names) > 3 else 0)
        ax.set_yticks(ticks, [str(n) for n in class_names])
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if num_classes <= ANNOTATE_MAX_CLASSES:
        integral = bool((counts == np.round(counts)).all())
        for (row, column), count in np.ndenumerate(counts):
            ax.text(
                column,
                row,
                f"{count:.0f}" if integral else f"{count:.2g}",
                ha="center",
                va="center",
                fontsize="small",
                color="white" if shares[row, column] > 0.5 else "black",
            )
    return save_png(figure, path)


def recall_figure(curves: Mapping[str, Mapping[int, float]], path: str | Path) -> Path:
    """Draws recall@k against k, one line per retrieval direction (and run).

    Args:
        curves: {line name: {k: recall@k}}, e.g. {"run_a image_to_text": {1: 0.6, 5: 0.9, 10: 0.95}}; recalls are
            fractions in [0, 1].
        path: where to write the PNG.

    Returns:
        The path written.

    Raises:
        InputError: no curves, a curve with no points, a k below 1, or a recall that is not in [0, 1].
    """
    if not curves:
        raise InputError("curves is empty: nothing to draw")
    all_ks: set[int] = set()
    for name, points in curves.items():
        if not points:
            raise InputError(f"curves[{name!r}] has no points: give it {{k: recall@k}}")
        for k, recall in points.items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise InputError(f"curves[{name!r}] has k={k!r}: k is a whole number of at least 1")
            if not 0.0 <= finite_number(f"curves[{name!r}][{k}]", recall) <= 1.0:
                raise InputError(f"curves[{name!r}][{k}] is {recall}: a recall is a fraction in [0, 1]")
        all_ks.update(points)

    figure = new_figure(7.0, 4.0)
    ax = figure.add_subplot()
    for name, points in curves.items():
        ks = sorted(points)
        ax.plot(ks, [points[k] for k in ks], marker="o", label=name)
    ax.set_xticks(sorted(all_ks))
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_title("retrieval: recall@k")
    ax.grid(alpha=0.3)
    legend_outside(ax)
    return save_png(figure, path)


def bar_figure(
    values: Mapping[str, float] | Mapping[str, Mapping[str, float]], path: str | Path, title: str, ylabel: str
) -> Path:
    """Draws bars, one per key; given several runs, one group per key with a bar per run side by side.

    Args:
        values: {name: value} for one run, or {run: {name: value}} for several (a name a run lacks is marked
            "n/a" in its place), e.g. per-family QA accuracy.
        path: where to write the PNG.
        title: drawn above the bars.
        ylabel: the value axis' label.

    Returns:
        The path written.

    Raises:
        InputError: no values, a run with no values, values that mix numbers and runs, or a value that is not a
            finite number.
    """
    if not values:
        raise InputError("values is empty: nothing to draw")
    nested = [isinstance(v, Mapping) for v in values.values()]
    if any(nested) and not all(nested):
        raise InputError("values mixes numbers and runs: give {name: value} or {run: {name: value}}")
    runs = dict(values) if all(nested) else {"": values}
    names: list[str] = []
    for run, run_values in runs.items():
        if not run_values:
            raise InputError(f"values[{run!r}] is empty: each run needs at least one value")
        for name, value in run_values.items():
            finite_number(f"values[{run!r}][{name!r}]" if run else f"values[{name!r}]", value)
            if name not in names:
                names.append(name)

    width = 0.8 / len(runs)
    figure = new_figure(min(max(5.0, 1.5 + 0.35 * len(names) * (len(runs) + 1)), 30.0), 4.5)
    ax = figure.add_subplot()
    all_values = []
    for i, (run, run_values) in enumerate(runs.items()):
        offset = (i - (len(runs) - 1) / 2) * width
        present = [j for j, name in enumerate(names) if name in run_values]
        heights = [float(run_values[names[j]]) for j in present]
        all_values += heights
        bars = ax.bar([j + offset for j in present], heights, width, label=run or None)
        if len(names) * len(runs) <= 40:
            ax.bar_label(bars, fmt="%.3g", fontsize="x-small", padding=1)
        for j in set(range(len(names))) - set(present):
            ax.text(j + offset, 0, "n/a", ha="center", va="bottom", rotation=90, fontsize="small", color="grey")
    if all(0.0 <= v <= 1.0 for v in all_values):
        ax.set_ylim(0.0, 1.08)  # fractions: a full axis, with room for the value labels
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30 if _longest(names) * len(names) > 60 else 0, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if len(runs) > 1:
        legend_outside(ax)
    return save_png(figure, path)


def sample_grid_figure(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    verdicts: Sequence[bool | None] | None,
    path: str | Path,
    columns: int = 8,
) -> Path:
    """Draws generated images in a grid, each under its caption, framed green ("right") or red ("wrong") by
    the judge's verdict.

    Args:
        images: the generated PIL images.
        captions: one prompt or caption per image.
        verdicts: per image True (the judge agrees), False (it does not) or None (no verdict); None for none at all.
        path: where to write the PNG.
        columns: images to a row.

    Returns:
        The path written.

    Raises:
        InputError: no images, captions or verdicts of another length than the images, an image that is not a PIL
            image, or fewer than one column.
    """
    if not images:
        raise InputError("images is empty: nothing to draw")
    if len(captions) != len(images):
        raise InputError(f"{len(images)} images but {len(captions)} captions: each image needs its caption")
    if verdicts is not None and len(verdicts) != len(images):
        raise InputError(f"{len(images)} images but {len(verdicts)} verdicts: give one per image, or None")
    if columns < 1:
        raise InputError(f"columns is {columns}: a grid needs at least one column")
    bad = next((i for i, image in enumerate(images) if not isinstance(image, Image.Image)), None)
    if bad is not None:
        raise InputError(f"images[{bad}] is a {type(images[bad]).__name__}: the grid draws PIL images")
    verdicts = list(verdicts) if verdicts is not None else [None] * len(images)

    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    cell = 1.8  # inches per image, with room for two lines of caption
    figure = new_figure(columns * cell, rows * (cell + 0.5) + 0.4)
    wrap = textwrap.TextWrapper(width=22, max_lines=2, placeholder="...")
    judged = [v for v in verdicts if v is not None]
    if judged:
        figure.suptitle(f"judged right: {sum(judged)} of {len(judged)}")
    for i, (image, caption, verdict) in enumerate(zip(images, captions, verdicts, strict=True)):
        ax = figure.add_subplot(rows, columns, i + 1)
        if image.mode in ("L", "1", "I", "F"):  # one channel: drawn in grey, at its own brightness
            ax.imshow(np.asarray(image.convert("L")), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        lines = wrap.wrap(caption) or [""]
        color = "black" if verdict is None else (RIGHT if verdict else WRONG)
        if verdict is not None:
            lines.append("right" if verdict else "wrong")
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(4)
        ax.set_title("\n".join(lines), fontsize="small", color=color)
    return save_png(figure, path)


def _number_array(values: Any, name: str) -> np.ndarray:
    """`values` as a float array; InputError unless every entry is a finite number."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{name} is not an array of numbers") from None
    if not np.isfinite(array).all():
        raise InputError(f"{name} holds values that are not finite (nan or inf)")
    return array


def _longest(names: Sequence[Any]) -> int:
    return max((len(str(n)) for n in names), default=0)


def legend_outside(ax: Any, columns: int = 1) -> None:
    """The legend to the right of the axes, so it never covers the data (constrained layout makes room)."""
    ax.legend(
        loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small", frameon=False, ncols=columns
    )
