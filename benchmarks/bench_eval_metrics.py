"""Caption metrics alone: mmfm.eval.captions against pycocoevalcap's scorers on the same tokenised captions.

5,000 seeded caption items (a prediction and five references each, 6-16 words from a 300-word vocabulary,
tokenised once by `ptb_tokenize`) are scored by both sides, interleaved in one process:

- CIDEr-D: `cider_d(..., tokenize=False)` vs `Cider().compute_score` (target: t_coco / t_mmfm >= 1.0);
- BLEU-1..4: `bleu(..., tokenize=False)` vs `Bleu(4).compute_score` (reported, target 1.0);
- ROUGE-L: `rouge_l(..., tokenize=False)` vs `Rouge().compute_score` (reported, target 1.0).

Before timing, each pair of scores must agree to 1e-6. `--quick` scores 200 items in 2 rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random

from benchmarks.harness import Result, compare, setup
from mmfm.eval.captions import bleu, cider_d, ptb_tokenize, rouge_l

TARGET = 1.0
REFERENCES = 5


def _corpus(items: int) -> tuple[list[str], list[list[str]]]:
    """Tokenised predictions and references: the references of an item share words, as captions of one image do."""
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(300)]
    predictions, references = [], []
    for _ in range(items):
        topic = rng.sample(vocabulary, 20)
        texts = [" ".join(rng.choice(topic) for _ in range(rng.randint(6, 16))) for _ in range(REFERENCES + 1)]
        predictions.append(texts[0])
        references.append(texts[1:])
    flat = iter(ptb_tokenize([r for refs in references for r in refs]))
    return ptb_tokenize(predictions), [[next(flat) for _ in refs] for refs in references]


def main(quick: bool = False) -> list[Result]:
    """Prints one table per metric; returns the three ratios t_pycocoevalcap / t_mmfm."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    setup()
    items, rounds = (200, 2) if quick else (5000, 5)
    predictions, references = _corpus(items)
    gts = dict(enumerate(references))
    res = {i: [p] for i, p in enumerate(predictions)}

    def coco_bleu() -> list[float]:
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its counts
            return list(Bleu(4).compute_score(gts, res, verbose=0)[0])

    metrics = {
        "cider_d": (
            lambda: cider_d(predictions, references, tokenize=False),
            lambda: Cider().compute_score(gts, res)[0],
        ),
        "bleu": (lambda: bleu(predictions, references, tokenize=False), coco_bleu),
        "rouge_l": (
            lambda: rouge_l(predictions, references, tokenize=False),
            lambda: Rouge().compute_score(gts, res)[0],
        ),
    }
    results = []
    print(f"\ncaption metrics on {items} items with {REFERENCES} references each, tokenised")
    for name, (ours, theirs) in metrics.items():
        a, b = ours(), theirs()
        a, b = (a, b) if isinstance(a, list) else ([a], [float(b)])
        if max(abs(x - y) for x, y in zip(a, b)) > 1e-6:
            raise AssertionError(f"{name}: mmfm {a} != pycocoevalcap {b}")
        timed = compare({"mmfm": ours, "pycocoevalcap": theirs}, rounds=rounds)
        print(timed.format(name))
        results.append(
            Result(f"{name}_vs_pycocoevalcap", timed.ratio("mmfm", "pycocoevalcap"), TARGET, "t_coco / t_mmfm")
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 items and 2 rounds, for a smoke run")
    args = parser.parse_args()
    for result in main(quick=args.quick):
        print(f"{result.name}: {result.ratio} (target >= {result.target:g}x)")
