"""Loss and metric curves drawn with Pillow (no plotting library needed): one panel per kind of series."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
_PANEL_W, _PANEL_H, _MARGIN = 560, 300, 48


def panel_of(name: str) -> str:
    """The panel a series goes to: training losses, held-out losses, held-out metrics or the learning rate."""
    if name.endswith("/loss"):
        return "train loss" if name.startswith("train/") else "held-out loss"
    if name.startswith("val/"):
        return "held-out metrics"
    return name


def plot_curves(series: dict[str, list[tuple[int, float]]], path: str | Path) -> Path:
    """Writes a PNG with one panel per `panel_of` group; each series is a polyline over its steps."""
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name, points in sorted(series.items()):
        if points:
            panels.setdefault(panel_of(name), {})[name] = points
    columns = 2
    rows = max(1, -(-len(panels) // columns))
    image = Image.new("RGB", (columns * _PANEL_W, rows * _PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, lines) in enumerate(sorted(panels.items())):
        _draw_panel(draw, (i % columns) * _PANEL_W, (i // columns) * _PANEL_H, title, lines)
    path = Path(path)
    image.save(path)
    return path


def _draw_panel(draw: ImageDraw.ImageDraw, x0: int, y0: int, title: str, lines: dict) -> None:
    steps = [s for pts in lines.values() for s, _ in pts]
    values = [v for pts in lines.values() for _, v in pts]
    s_lo, s_hi = min(steps), max(steps)
    v_lo, v_hi = min(values), max(values)
    if v_hi == v_lo:
        v_lo, v_hi = v_lo - 0.5, v_hi + 0.5
    left, top = x0 + _MARGIN, y0 + 24
    right, bottom = x0 + _PANEL_W - 12, y0 + _PANEL_H - 28

    def xy(step: int, value: float) -> tuple[float, float]:
        fx = (step - s_lo) / (s_hi - s_lo) if s_hi > s_lo else 0.5
        return left + fx * (right - left), bottom - (value - v_lo) / (v_hi - v_lo) * (bottom - top)

    draw.rectangle([left, top, right, bottom], outline="#888888")
    draw.text((left, y0 + 6), title, fill="black")
    draw.text((x0 + 2, top), f"{v_hi:.3g}", fill="#444444")
    draw.text((x0 + 2, bottom - 10), f"{v_lo:.3g}", fill="#444444")
    draw.text((left, bottom + 4), f"step {s_lo}", fill="#444444")
    draw.text((right - 70, bottom + 4), f"step {s_hi}", fill="#444444")
    for j, (name, points) in enumerate(lines.items()):
        color = _COLORS[j % len(_COLORS)]
        coords = [xy(s, v) for s, v in points]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        else:
            cx, cy = coords[0]
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=color)
        draw.text((left + 6, top + 4 + 12 * j), name, fill=color)
