"""Evaluation figures: valid PNGs that show what they claim (row-normalised confusion colours, the judge's green and
red verdicts, one colour per run), and clear errors on bad input."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mmfm.errors import InputError
from mmfm.eval.figures import RIGHT, WRONG, bar_figure, confusion_figure, recall_figure, sample_grid_figure

DARKEST_BLUE = (8, 48, 107)  # matplotlib's "Blues" at 1.0: a cell holding its whole row
FIRST_RUN, SECOND_RUN = (31, 119, 180), (255, 127, 14)  # the first two colours of matplotlib's cycle
FAMILIES = {"count": 0.9, "colour": 0.75, "spoken_digit": 0.5}


def _digits(count: int) -> list[Image.Image]:
    images = []
    for i in range(count):
        image = Image.new("L", (28, 28))
        ImageDraw.Draw(image).text((10, 8), str(i % 10), fill=255)
        images.append(image)
    return images


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _count(pixels: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((pixels == colour).all(axis=-1).sum())


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """{name: path} of every figure, drawn once for the whole module."""
    out = tmp_path_factory.mktemp("figures")
    images = _digits(10)
    return {
        "confusion": confusion_figure(torch.tensor([[100, 0], [0, 1]]), ["cat", "dog"], out / "confusion.png"),
        "confusion_even": confusion_figure([[1, 0], [0, 1]], ["cat", "dog"], out / "even.png", title="even"),
        "recall": recall_figure(
            {"image_to_text": {1: 0.6, 5: 0.9, 10: 0.97}, "text_to_image": {1: 0.5, 5: 0.8, 10: 0.9}}, out / "r.png"
        ),
        "bars": bar_figure(FAMILIES, out / "bars.png", "QA accuracy", "accuracy"),
        "bars_runs": bar_figure(
            {"a": FAMILIES, "b": {"count": 1.0, "colour": 0.25}}, out / "runs.png", "QA accuracy", "accuracy"
        ),
        "grid": sample_grid_figure(images, [f"the digit {i}" for i in range(10)], [True, False] * 5, out / "g.png"),
        "grid_unjudged": sample_grid_figure(images[:3], ["a", "b", "c"], None, out / "plain.png", columns=2),
    }


@pytest.mark.parametrize("name", ["confusion", "recall", "bars", "bars_runs", "grid", "grid_unjudged"])
def test_each_figure_is_a_png_with_something_drawn(drawn, name):
    pixels = _pixels(drawn[name]).astype(np.int32)
    assert 150 <= pixels.shape[0] <= 2000 and 150 <= pixels.shape[1] <= 3000
    assert len(np.unique(pixels[..., 0] << 16 | pixels[..., 1] << 8 | pixels[..., 2])) > 20


def test_confusion_colours_each_row_by_its_share_so_a_rare_class_reads_like_a_common_one(drawn):
    # [[100, 0], [0, 1]]: both classes always right, so both diagonal cells are as dark as [[1, 0], [0, 1]]'s
    rare = _count(_pixels(drawn["confusion"]), DARKEST_BLUE)
    even = _count(_pixels(drawn["confusion_even"]), DARKEST_BLUE)
    assert rare > 10_000
    assert abs(rare - even) < 0.05 * even


def test_sample_grid_frames_each_verdict_green_or_red_and_none_without_verdicts(drawn):
    judged, plain = _pixels(drawn["grid"]), _pixels(drawn["grid_unjudged"])
    assert _count(judged, _hex(RIGHT)) > 500 and _count(judged, _hex(WRONG)) > 500
    assert _count(plain, _hex(RIGHT)) == 0 and _count(plain, _hex(WRONG)) == 0


def test_bars_of_several_runs_get_one_colour_per_run(drawn):
    one, several = _pixels(drawn["bars"]), _pixels(drawn["bars_runs"])
    assert _count(several, FIRST_RUN) > 1000 and _count(several, SECOND_RUN) > 1000
    assert _count(one, SECOND_RUN) == 0


@pytest.mark.parametrize(
    ("draw", "message"),
    [
        (lambda p: confusion_figure([[1, 2, 3], [4, 5, 6]], ["a", "b"], p), "square"),
        (lambda p: confusion_figure([[1, 0], [0, 1]], ["a", "b", "c"], p), "3 class names"),
        (lambda p: confusion_figure(np.zeros((0, 0)), [], p), "empty"),
        (lambda p: confusion_figure([[1, -1], [0, 1]], ["a", "b"], p), "negative"),
        (lambda p: confusion_figure([[1, float("nan")], [0, 1]], ["a", "b"], p), "not finite"),
        (lambda p: recall_figure({}, p), "curves is empty"),
        (lambda p: recall_figure({"image_to_text": {}}, p), "'image_to_text'.*no points"),
        (lambda p: recall_figure({"image_to_text": {0: 0.5}}, p), "k=0"),
        (lambda p: recall_figure({"image_to_text": {1: 62.0}}, p), r"\[0, 1\]"),
        (lambda p: bar_figure({}, p, "t", "y"), "values is empty"),
        (lambda p: bar_figure({"a": {"x": 1.0}, "b": 0.5}, p, "t", "y"), "mixes"),
        (lambda p: bar_figure({"a": {}}, p, "t", "y"), r"values\['a'\] is empty"),
        (lambda p: bar_figure({"x": "high"}, p, "t", "y"), r"values\['x'\].*number"),
        (lambda p: sample_grid_figure([], [], None, p), "images is empty"),
        (lambda p: sample_grid_figure(_digits(2), ["a"], None, p), "2 images but 1 captions"),
        (lambda p: sample_grid_figure(_digits(2), ["a", "b"], [True], p), "1 verdicts"),
        (lambda p: sample_grid_figure([np.zeros((4, 4))], ["a"], None, p), r"images\[0\] is a ndarray"),
        (lambda p: sample_grid_figure(_digits(1), ["a"], None, p, columns=0), "at least one column"),
    ],
)
def test_bad_input_is_an_input_error_that_says_what_is_wrong(tmp_path, draw, message):
    with pytest.raises(InputError, match=message):
        draw(tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
