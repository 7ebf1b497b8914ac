"""Evaluation: standard metrics as plain functions over predictions and references, and `mmfm eval`'s runner.

One module per family of metrics, each usable without a model:

- `mmfm.eval.captions`: BLEU-1..4, CIDEr-D, ROUGE-L and exact match over several references per item, with the
  COCO caption evaluation's PTB tokenisation (parity with pycocoevalcap);
- `mmfm.eval.retrieval`: R@1/5/10 and median rank in both directions;
- `mmfm.eval.classification`: top-k, per-class accuracy, confusion matrix, zero-shot classifiers from templates;
- `mmfm.eval.multilabel`: mAP and per-class average precision;
- `mmfm.eval.qa`: answer accuracy after normalisation, per question family;
- `mmfm.eval.generation`: judged accuracy, diversity, CLIP-score-style agreement;
- `mmfm.eval.figures`: confusion matrix, recall@k curves, grouped bars and generated-sample grids as PNGs
  (matplotlib).

Bad input (lengths that differ, an item with no references, nothing to score) raises `mmfm.InputError` naming
the input and what is wrong (`mmfm.eval.checks`).
"""
