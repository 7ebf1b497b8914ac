"""A run's curves.png: titled panels, losses on a log axis, held-out values as markers, legends off the data, the
headline held-out metrics apart from ranks, per-class accuracies left to the eval report."""

import numpy as np
import pytest
from PIL import Image

from mmfm.train.plot import curves_figure, plot_curves

STEPS = list(range(20, 420, 20))


def _run_series() -> dict[str, list[tuple[int, float]]]:
    """Metrics shaped like the digits demo's: one loss falls from 3.5 to 1e-5, held-out values at two steps."""
    return {
        "train/audio_classify/loss": [(s, 3.5 * 10 ** (-5.5 * i / (len(STEPS) - 1))) for i, s in enumerate(STEPS)],
        "train/image_caption/loss": [(s, 3.2 / (1 + i)) for i, s in enumerate(STEPS)],
        "train/lr": [(s, 2e-3 * (1 - i / len(STEPS))) for i, s in enumerate(STEPS)],
        "train/samples_per_s": [(s, 18.0 + i % 3) for i, s in enumerate(STEPS)],
        "val/audio_classify/loss": [(200, 7e-4), (400, 1.7e-5)],
        "val/image_caption/loss": [(200, 0.14), (400, 0.09)],
        "val/image_caption/exact_match": [(200, 0.57), (400, 0.87)],
        "val/image_text/r1_image_to_text": [(100, 0.5), (200, 0.85), (400, 0.96)],
        "val/image_text/median_rank_image_to_text": [(100, 41.0), (200, 6.5), (400, 1.0)],
        "val/image_text/median_rank_text_to_image": [(100, 37.0), (200, 4.0), (400, 1.5)],
        "val/image_caption/cider_d": [(200, 1.4), (400, 2.5)],  # 0..10: not drawn among the 0..1 metrics
        "val/image_caption/bleu_1": [(200, 0.9), (400, 0.97)],
        "val/image_caption/bleu_4": [(200, 0.8), (400, 0.96)],
        "val/image_classify/top1": [(200, 0.9), (400, 0.96)],
        "val/image_classify/top5": [(200, 1.0), (400, 1.0)],
        **{f"val/image_classify/accuracy/{d}": [(200, 0.9), (400, 0.95)] for d in range(10)},
    }


@pytest.fixture(scope="module")
def panels():
    """{panel title: axes} of the demo-like run's figure."""
    figure = curves_figure(_run_series())
    figure.canvas.draw()  # lays the figure out, so that legend and axes positions are final
    return {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}


def test_panels_have_titles_and_labelled_axes(panels):
    assert list(panels) == [
        "training loss",
        "held-out loss",
        "held-out metrics",
        "held-out median rank",
        "learning rate",
        "throughput",
    ]
    for title, ax in panels.items():
        assert ax.get_xlabel() == "step", title
        assert ax.get_ylabel(), title
        assert [t.get_text() for t in ax.get_xticklabels() if t.get_text()], title
    assert panels["training loss"].get_ylabel() == "loss"


def test_losses_are_on_a_log_axis_that_reaches_the_smallest_loss(panels):
    for title in ("training loss", "held-out loss"):
        ax = panels[title]
        assert ax.get_yscale() == "log", title
        low, high = ax.get_ylim()
        assert low <= 1.7e-5 and high >= 3.5
    assert panels["held-out metrics"].get_yscale() == "linear"


def test_held_out_metrics_show_the_headline_numbers_and_ranks_have_a_log_panel(panels):
    shown = {line.get_label() for line in panels["held-out metrics"].get_lines()}
    assert shown == {
        "image_caption/exact_match",
        "image_caption/bleu_4",
        "image_classify/top1",
        "image_text/r1_image_to_text",
    }  # no per-class accuracy, BLEU-1, top-5 or CIDEr-D: they are in metrics.csv and the eval report
    low, high = panels["held-out metrics"].get_ylim()
    assert low > -0.1 and high < 1.1  # ranks (up to 41) do not squash the 0..1 metrics
    ranks = panels["held-out median rank"]
    assert ranks.get_yscale() == "log" and ranks.get_ylim()[0] <= 1.0 and ranks.get_ylim()[1] >= 41
    assert {line.get_label() for line in ranks.get_lines()} == {
        "image_text/median_rank_image_to_text",
        "image_text/median_rank_text_to_image",
    }
    labels = [t.get_text() for t in ranks.get_yticklabels(minor=False) + ranks.get_yticklabels(minor=True)]
    assert "10" in labels and not any("times" in t or "^" in t for t in labels)  # plain numbers, not 10^1


def test_held_out_values_are_markers_joined_only_from_three_points(panels):
    lines = {line.get_label(): line for line in panels["held-out metrics"].get_lines()}
    two, three = lines["image_caption/exact_match"], lines["image_text/r1_image_to_text"]
    assert two.get_linestyle() == "None" and two.get_marker() not in ("None", "", None)
    assert list(two.get_xdata()) == [200, 400]
    assert three.get_linestyle() == "-" and three.get_marker() not in ("None", "", None)
    for line in panels["held-out loss"].get_lines():
        assert line.get_linestyle() == "None" and line.get_marker() == "o"


def test_a_task_keeps_its_colour_across_panels(panels):
    def colours(title):
        return {line.get_label().split("/")[0]: line.get_color() for line in panels[title].get_lines()}

    train, held_out = colours("training loss"), colours("held-out loss")
    assert train["image_caption"] == held_out["image_caption"] != train["audio_classify"]


def test_legends_sit_beside_the_data_not_on_it(panels):
    for title in ("training loss", "held-out loss", "held-out metrics", "held-out median rank"):
        ax = panels[title]
        legend, data = ax.get_legend().get_window_extent(), ax.get_window_extent()
        assert legend.x0 >= data.x1, title


def test_a_loss_of_zero_or_below_switches_the_log_axis_to_symlog():
    figure = curves_figure({"train/a/loss": [(1, 2.0), (2, 0.0)], "val/a/loss": [(2, 0.5)]})
    assert {ax.get_title(): ax.get_yscale() for ax in figure.axes} == {
        "training loss": "symlog",
        "held-out loss": "symlog",
    }


def test_plot_curves_writes_a_readable_png(tmp_path):
    losses = [(s, 3.0 / s) for s in STEPS] + [(420, float("nan"))]  # a diverged step is left out, not drawn
    path = plot_curves({"train/a/loss": losses, "val/a/loss": [(200, 0.02), (400, 0.01)]}, tmp_path / "curves.png")
    assert path == tmp_path / "curves.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 1000 and image.height > 300
        pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    colours = np.unique(pixels[..., 0] << 16 | pixels[..., 1] << 8 | pixels[..., 2])
    assert len(colours) > 50  # drawn on, not a blank canvas


def test_nothing_logged_yet_still_draws_a_figure(tmp_path):
    # a checkpoint can be saved before the first log step: its redraw must not fail
    with Image.open(plot_curves({"train/a/loss": []}, tmp_path / "curves.png")) as image:
        assert image.format == "PNG" and image.width > 100
