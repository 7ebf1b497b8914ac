"""The digits judge reads real held-out digits right, at any size, and tells noise and sameness apart."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from mmfm.data.judge import DigitsJudge, to_grids
from mmfm.eval.generation import diversity


def _as_images(grids: np.ndarray, size: int = 8) -> list[Image.Image]:
    """0..16 digit grids as 8-bit PIL images (ink bright), upscaled by pixel repetition to `size`."""
    pixels = np.round(grids * (255 / 16)).astype(np.uint8)
    return [Image.fromarray(p).resize((size, size), Image.Resampling.NEAREST) for p in pixels]


@pytest.fixture(scope="module")
def split():
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    return digits, order[:1400], order[1400:]


@pytest.fixture(scope="module")
def judge(split):
    return DigitsJudge(split[1])


@pytest.mark.parametrize("size", [8, 16, 32])
def test_held_out_real_digits_are_read_right_at_any_size(judge, split, size):
    digits, _, held_out = split
    images = _as_images(digits.images[held_out], size)
    assert judge.accuracy(images, digits.target[held_out]) > 0.97
    assert judge(images[:5]) == judge.predict(images[:5]) == [int(t) for t in digits.target[held_out][:5]]


def test_noise_is_not_read_as_the_digits_it_is_labelled(judge):
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)) for _ in range(200)]
    labels = rng.integers(0, 10, 200)
    assert judge.accuracy(noise, labels) < 0.3
    assert diversity(noise) > 0.35  # uniform noise: sqrt(1/6) ~ 0.41


def test_judge_fits_on_a_manifest(tmp_path, split):
    digits, train, held_out = split
    (tmp_path / "images").mkdir()
    lines = []
    for i in train[:500]:
        _as_images(digits.images[i : i + 1])[0].save(tmp_path / "images" / f"{i}.png")
        lines.append(f'{{"image": "images/{i}.png", "label": "{digits.target[i]}"}}\n')
    (tmp_path / "train.jsonl").write_text("".join(lines))
    judge = DigitsJudge.from_manifest(tmp_path / "train.jsonl")
    assert judge.accuracy(_as_images(digits.images[held_out]), digits.target[held_out]) > 0.93


def test_grids_undo_the_8_bit_rendering_and_box_filter_larger_images():
    digits = load_digits()
    grids = to_grids(_as_images(digits.images[:10], 24))
    np.testing.assert_allclose(grids, digits.images[:10], atol=16 / 255)
    rgb = Image.new("RGB", (16, 16), (255, 255, 255))
    np.testing.assert_allclose(to_grids([rgb]), np.full((1, 8, 8), 16.0))
