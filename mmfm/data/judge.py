"""A judge of generated digits: an SVM fitted on real 8x8 handwritten digits reads what an image shows.

scikit-learn's digits are 32x32 bitmaps whose 4x4 blocks were counted into 8x8 grids of 0..16, ink bright on
black. The judge reads any image the same way: greyscale, box-filtered (block-averaged) to 8x8 and scaled to
0..16, then classified by an RBF SVM, which reads held-out real digits about 99% right. Used to score an
image_gen model ("does the image of a seven look like a seven?"), as the judge of
`mmfm.eval.generation.judged_accuracy`.

```python
judge = DigitsJudge.from_manifest("data/digits/train.jsonl")   # or DigitsJudge(): every real digit
digits = judge.predict(model.generate_image(text=["the digit 7"], num_images=8))   # e.g. [7, 7, 1, 7, ...]
print(judge.accuracy(images, [7] * 8))
```
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mmfm.errors import InputError

SIDE = 8  # the digits' grid
MAX_VALUE = 16.0  # their value range: 0..16 on-pixels per 4x4 block


class DigitsJudge:
    """An RBF SVM over 8x8 digit grids (0..16), fitted on real handwritten digits.

    Args:
        indices: rows of scikit-learn's `load_digits()` to fit on (e.g. a training split); None fits on all 1,797.
    """

    def __init__(self, indices: Sequence[int] | None = None):
        from sklearn.datasets import load_digits

        digits = load_digits()
        rows = np.arange(len(digits.target)) if indices is None else np.asarray(indices)
        self._fit(digits.data[rows], digits.target[rows])

    @classmethod
    def from_manifest(cls, path: str | Path) -> DigitsJudge:
        """A judge fitted on the images and labels of a JSONL manifest, as `mmfm data digits` writes them.

        Each line needs "image" (a path, relative to the manifest's folder) and "label" (the digit).
        """
        path = Path(path)
        images, labels = [], []
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                with Image.open(path.parent / record["image"]) as image:
                    images.append(image.copy())
                labels.append(int(record["label"]))
        judge = cls.__new__(cls)
        judge._fit(to_grids(images), np.asarray(labels))
        return judge

    def _fit(self, grids: np.ndarray, labels: np.ndarray) -> None:
        from sklearn.svm import SVC  # scikit-learn takes a second to import: only when a judge is made

        # gamma for features in 0..16: the scikit-learn digits example's setting, ~99% on held-out digits
        self.classifier = SVC(gamma=0.001, C=10.0).fit(grids.reshape(len(grids), -1), labels)

    def predict(self, images: Sequence[Image.Image]) -> list[int]:
        """The digit each image shows, as read from its 8x8 grid."""
        grids = to_grids(images)
        return [int(d) for d in self.classifier.predict(grids.reshape(len(grids), -1))]

    __call__ = predict

    def accuracy(self, images: Sequence[Image.Image], digits: Sequence[int | str]) -> float:
        """The fraction of images read as the digit they should show."""
        predicted = self.predict(images)
        return float(np.mean([p == int(d) for p, d in zip(predicted, digits, strict=True)]))


def to_grids(images: Sequence[Image.Image]) -> np.ndarray:
    """PIL images (any size and mode) -> (N, 8, 8) float64 grids in 0..16, as scikit-learn's digits are."""
    if not images:
        raise InputError("no images to judge")
    grids = [np.asarray(im.convert("L").resize((SIDE, SIDE), Image.Resampling.BOX), dtype=np.float64) for im in images]
    return np.stack(grids) * (MAX_VALUE / 255.0)
