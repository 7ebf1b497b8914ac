"""`mmfm eval` batched against item by item: the digits validation split, every held-out metric, same numbers.

    python -m benchmarks.bench_eval --model runs/demo/final --data data/digits

Times `mmfm.eval.run.evaluate_data` on the demo model and `data/digits/val.jsonl` (359 items: caption BLEU/CIDEr-D/
ROUGE-L/exact match and token accuracy for images and tones, classification, paired and label retrieval, the
losses) at `--batch-size 64` and at batch size 1, in interleaved rounds; generation metrics are left out (both
would sample the same images in the same batches). Headline ratio `eval_batched_vs_item_by_item`: t_item / t_batched
(target >= 5x). The numbers of both runs are compared too: every metric but the losses of objectives that depend on
the batch (InfoNCE, the diffusion noise) must agree. `--quick` runs a random mmfm-test on 5 tiny digits instead;
without the demo's checkpoint or data the full run is skipped.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import mmfm
from benchmarks.harness import Result, compare, setup, table
from mmfm.eval.run import evaluate_data

DEFAULT_MODEL = Path("runs/demo/final")
DEFAULT_DATA = Path("data/digits")
TARGET = 5.0
BATCH = 64
RATIO = "eval_batched_vs_item_by_item"


def main(quick: bool = False, model_dir: str | Path | None = None, data_dir: str | Path | None = None) -> list[Result]:
    """Prints the timing table and returns the batched / item-by-item ratio (none when skipped)."""
    setup()
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            from mmfm.data import write_digits

            model, name = mmfm.create_model("mmfm-test").eval(), "mmfm-test (random)"
            manifest = write_digits(Path(tmp) / "digits", seed=0, limit=24) / "val.jsonl"
        else:
            model_dir, data_dir = Path(model_dir or DEFAULT_MODEL), Path(data_dir or DEFAULT_DATA)
            manifest = data_dir / "val.jsonl"
            if not (model_dir / "config.yaml").is_file() or not manifest.is_file():
                print(f"\nmmfm eval batched vs item by item: skipped, needs {model_dir} and {manifest} (make demo)")
                return []
            model, name = mmfm.load(model_dir), str(model_dir)

        def run(batch_size: int):
            return lambda: (
                evaluate_data(model, manifest, model_name=name, batch_size=batch_size, images_per_class=0).metrics
            )

        with torch.inference_mode():
            result = compare({"batched": run(BATCH), "item_by_item": run(1)}, rounds=1 if quick else 3, warmup=0)
    batched, single = result.outputs["batched"], result.outputs["item_by_item"]
    compared = [k for k in batched if not k.endswith("/loss")]
    worst = max(abs(batched[k] - single[k]) for k in compared)
    print(
        f"\nmmfm eval batched (batch {BATCH}) vs item by item (batch 1): {name} on {manifest}, "
        f"{len(batched)} metrics, {torch.get_num_threads()} threads"
    )
    print(table(["run", "median time"], [[k, f"{result.median(k):.2f} s"] for k in result.times]))
    print(f"largest difference over the {len(compared)} metrics other than losses: {worst:.2e}")
    print(result.format("evaluation time"))
    return [Result(RATIO, result.ratio("batched", "item_by_item"), TARGET, "t_item_by_item / t_batched")]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help=f"a saved model ({DEFAULT_MODEL})")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help=f"the digits data folder ({DEFAULT_DATA})")
    parser.add_argument("--quick", action="store_true", help="a random mmfm-test on 5 tiny digits, one round")
    args = parser.parse_args()
    main(args.quick, args.model, args.data)
