"""What a run writes besides checkpoints: a long-format CSV of every metric, optional TensorBoard events,
and the curves as a PNG."""

from __future__ import annotations

import csv
from pathlib import Path

from mmfm.errors import ConfigError
from mmfm.train.plot import plot_curves

METRICS_NAME = "metrics.csv"
CURVES_NAME = "curves.png"


class RunLog:
    """Appends `step,name,value` rows to RUN/metrics.csv (and TensorBoard scalars when asked).

    A resumed run first drops the rows past the step it resumes from, so the file reads as one run.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = False, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_NAME
        rows = []
        if resume_step is not None and self.path.exists():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "name", "value"])
            writer.writerows([r["step"], r["name"], r["value"]] for r in rows)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerows([step, name, f"{value:.9g}"] for name, value in values.items())
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def plot(self) -> Path:
        """Redraws RUN/curves.png from the CSV."""
        return plot_curves(read_metrics(self.path), self.run_dir / CURVES_NAME)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{name: [(step, value), ...]} from a metrics CSV."""
    series: dict[str, list[tuple[int, float]]] = {}
    with Path(path).open() as f:
        for row in csv.DictReader(f):
            series.setdefault(row["name"], []).append((int(row["step"]), float(row["value"])))
    return series
