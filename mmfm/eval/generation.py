"""Image generation metrics: does a judge read the intended content, are the images varied, do they fit the text.

- `judged_accuracy`: a judge the user provides (any function from images to what each one shows, such as
  `mmfm.data.judge.DigitsJudge`) reads every image; the fraction read as its target.
- `diversity`: the mean pairwise root-mean-square pixel distance; 0 when every image is the same.
  `diversity_by_label` averages it over the labels, each label's images compared among themselves.
- `generation_metrics`: both over images generated per label, as `mmfm eval` and `examples/digits_generation.py`
  score them.
- `clip_score`: CLIPScore (Hessel et al., 2021), w * max(cos(image, text), 0) averaged over the pairs, from the
  embeddings of a model with a contrastive head (`model.embed`).

```python
judge = DigitsJudge()
images = model.generate_image(text=["the digit 7"] * 8)
judged_accuracy(images, [7] * 8, judge), diversity(images)
images = model.generate_image(text=["the digit 1", "the digit 7"], num_images=8)   # 8 ones, then 8 sevens
generation_metrics(images, [1] * 8 + [7] * 8, judge)   # ({"judged_accuracy": ..., "diversity": ...}, verdicts)
clip_score(model.embed(images=images), model.embed(text=["the digit 7"] * 8))
```
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mmfm.errors import InputError
from mmfm.eval.checks import check_lengths, matrix
from mmfm.text_generation import finite_number


def judge_verdicts(
    images: Sequence[Image.Image], targets: Sequence[Any], judge: Callable[[list[Image.Image]], Sequence[Any]]
) -> list[bool]:
    """Whether the judge reads each image as its target.

    Readings and targets are compared as text, stripped, so a judge that answers 7 agrees with the target "7".

    Args:
        images: the generated images.
        targets: what each image should show.
        judge: images -> one reading per image.

    Raises:
        InputError: images and targets of different lengths, no images, or a judge that does not give one
            reading per image.
    """
    check_lengths(images, targets, ("images", "targets"))
    readings = list(judge(list(images)))
    if len(readings) != len(images):
        raise InputError(f"the judge gave {len(readings)} readings for {len(images)} images: it must read each once")
    return [str(r).strip() == str(t).strip() for r, t in zip(readings, targets)]


def judged_accuracy(
    images: Sequence[Image.Image], targets: Sequence[Any], judge: Callable[[list[Image.Image]], Sequence[Any]]
) -> float:
    """The fraction of images the judge reads as their target; see `judge_verdicts`."""
    verdicts = judge_verdicts(images, targets, judge)
    return sum(verdicts) / len(verdicts)


def diversity(images: Sequence[Image.Image]) -> float:
    """The root-mean-square pixel difference (greyscale, pixels in [0, 1]) averaged over all pairs of images.

    0 when every image is the same; 1 for an all-black and an all-white image.

    Raises:
        InputError: fewer than two images, or images of different sizes.
    """
    if len(images) < 2:
        raise InputError(f"need at least two images to compare, got {len(images)}")
    bad = next((i for i, im in enumerate(images) if not isinstance(im, Image.Image)), None)
    if bad is not None:
        raise InputError(f"images[{bad}] is a {type(images[bad]).__name__}, not a PIL image")
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise InputError(f"images must share one size, got sizes {sorted(sizes)}")
    pixels = torch.from_numpy(np.stack([np.asarray(im.convert("L"), dtype=np.float64) for im in images]) / 255.0)
    pixels = pixels.flatten(1)  # (N, H * W)
    # exact differences, not the |a|^2 + |b|^2 - 2ab shortcut, which is not exactly 0 for equal images
    distances = torch.cdist(pixels, pixels, compute_mode="donot_use_mm_for_euclid_dist") / pixels.shape[1] ** 0.5
    pairs = torch.triu_indices(len(images), len(images), offset=1)
    return float(distances[pairs[0], pairs[1]].mean())


def diversity_by_label(images: Sequence[Image.Image], labels: Sequence[Any]) -> float | None:
    """`diversity` among each label's images, averaged over the labels that have two images or more.

    Args:
        images: the images.
        labels: the label of each image; images of one label are compared with each other only.

    Returns:
        The average, or None when no label has two images.

    Raises:
        InputError: images and labels of different lengths, no images, or images `diversity` refuses.
    """
    check_lengths(images, labels, ("images", "labels"))
    groups: dict[Any, list[Image.Image]] = {}
    for image, label in zip(images, labels):
        groups.setdefault(label, []).append(image)
    values = [diversity(group) for group in groups.values() if len(group) > 1]
    return sum(values) / len(values) if values else None


def generation_metrics(
    images: Sequence[Image.Image],
    labels: Sequence[Any],
    judge: Callable[[list[Image.Image]], Sequence[Any]] | None = None,
) -> tuple[dict[str, float], list[bool] | None]:
    """The judged accuracy and the diversity of images generated per label.

    Args:
        images: the images.
        labels: what each image should show.
        judge: images -> one reading per image (see `judge_verdicts`); None: no judged accuracy.

    Returns:
        {"judged_accuracy" (with a judge), "diversity" (`diversity_by_label`, when a label has two images)}, and
        the judge's verdict on each image (None without a judge).

    Raises:
        InputError: see `judge_verdicts` and `diversity_by_label`.
    """
    metrics = {}
    verdicts = None
    if judge is not None:  # judged once: the verdicts are kept (a report draws them), their mean is the accuracy
        verdicts = judge_verdicts(images, labels, judge)
        metrics["judged_accuracy"] = sum(verdicts) / len(verdicts)
    spread = diversity_by_label(images, labels)
    if spread is not None:
        metrics["diversity"] = spread
    return metrics, verdicts


def clip_score(image_embeddings: Tensor, text_embeddings: Tensor, w: float = 2.5) -> float:
    """CLIPScore: w * max(cosine similarity, 0) of each image with its own text, averaged over the pairs.

    Args:
        image_embeddings: (N, E) embeddings of the images.
        text_embeddings: (N, E) embeddings of their texts, row i paired with image i.
        w: the scale; 2.5 as in the CLIPScore paper (which then reports the score times 100).

    Raises:
        InputError: embeddings that are not 2-D, empty, not finite, or of different shapes.
    """
    w = finite_number("w", w, above=0)
    images = matrix("image_embeddings", image_embeddings)
    texts = matrix("text_embeddings", text_embeddings, rows=len(images), columns=images.shape[1])
    cosine = torch.nn.functional.cosine_similarity(images.double(), texts.to(images.device).double(), dim=-1)
    return float(w * cosine.clamp(min=0).mean())
