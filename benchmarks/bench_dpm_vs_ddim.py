"""DPM-Solver++ at 20 steps against DDIM at 50 on a trained digits image_gen model: speed and judged quality.

    python -m benchmarks.bench_dpm_vs_ddim --model runs/demo/final --data data/digits

Both samplers draw `--per-digit` images of each digit from the prompt "the digit {d}" through
`model.generate_image` (same seed, guidance and batch), timed in interleaved rounds. A `DigitsJudge` fitted on
the data's training manifest reads every image: accuracy is the fraction read as the prompted digit, diversity
the mean pairwise RMS distance among one digit's images (averaged over digits). Headline ratios: the speed-up
t_ddim / t_dpm (target >= 2.3x) and accuracy_dpm / accuracy_ddim (target >= 0.95). Without a trained
checkpoint (the demo's run folder) or the digits data this benchmark is skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import mmfm
from benchmarks.harness import Ratio, Result, compare, setup, table
from mmfm.data.judge import DigitsJudge
from mmfm.eval.generation import generation_metrics

DEFAULT_MODEL = Path("runs/demo/final")
DEFAULT_DATA = Path("data/digits")
SPEED_TARGET = 2.3
ACCURACY_TARGET = 0.95
SAMPLERS = {"dpmsolver++_20": ("dpmsolver++", 20), "ddim_50": ("ddim", 50)}


def main(
    quick: bool = False,
    model_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    per_digit: int | None = None,
    prompt: str = "the digit {}",
) -> list[Result]:
    """Prints the timing and quality tables and returns the speed and accuracy ratios (none when skipped)."""
    model_dir = Path(model_dir or DEFAULT_MODEL)
    if (model_dir / "final").is_dir():  # a run folder: take its final model
        model_dir = model_dir / "final"
    data_dir = Path(data_dir or DEFAULT_DATA)
    manifest = data_dir / "train.jsonl"
    if not (model_dir / "config.yaml").is_file():
        print(f"\nDPM-Solver++ vs DDIM: skipped, no trained checkpoint at {model_dir} (train the digits demo first)")
        return []
    if not manifest.is_file():
        print(f"\nDPM-Solver++ vs DDIM: skipped, no {manifest} (write it with `mmfm data digits {data_dir}`)")
        return []
    setup()
    model = mmfm.load(model_dir)
    if "image_gen" not in model.heads:
        print(f"\nDPM-Solver++ vs DDIM: skipped, the model at {model_dir} has no image_gen head")
        return []
    judge = DigitsJudge.from_manifest(manifest)
    per_digit = per_digit or (2 if quick else 10)
    prompts = [prompt.format(d) for d in range(10)]
    digits = [d for d in range(10) for _ in range(per_digit)]

    def sampler(name: str, steps: int):
        return lambda: model.generate_image(
            text=prompts, num_images=per_digit, scheduler=name, num_inference_steps=steps, seed=0
        )

    with torch.inference_mode():
        result = compare({k: sampler(*v) for k, v in SAMPLERS.items()}, rounds=1 if quick else 5, warmup=0)
    rows, accuracy = [], {}
    for key, images in result.outputs.items():
        metrics, _ = generation_metrics(images, digits, judge)
        accuracy[key] = metrics["judged_accuracy"]
        rows.append([key, f"{result.median(key):.2f} s", f"{accuracy[key]:.3f}", f"{metrics['diversity']:.3f}"])

    gen = model.config.image_gen
    print(
        f"\nDPM-Solver++ (20 steps) vs DDIM (50 steps): {model_dir}, {10 * per_digit} images "
        f"({per_digit} per digit, prompt {prompt!r}), {gen.image_size}x{gen.image_size} px, guidance "
        f"{gen.guidance_scale}, {torch.get_num_threads()} threads"
    )
    print(table(["sampler", "median time", "judged accuracy", "diversity"], rows))
    print(result.format("sampling time"))
    quality = accuracy["dpmsolver++_20"] / max(accuracy["ddim_50"], 1e-9)
    return [
        Result("dpm20_vs_ddim50_speed", result.ratio("dpmsolver++_20", "ddim_50"), SPEED_TARGET, "t_ddim / t_dpm"),
        Result("dpm20_vs_ddim50_accuracy", Ratio(quality, quality, quality), ACCURACY_TARGET, "acc_dpm / acc_ddim"),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help=f"a saved model or run folder ({DEFAULT_MODEL})")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help=f"the digits data folder ({DEFAULT_DATA})")
    parser.add_argument("--per-digit", type=int, help="images per digit (default: 10; 2 with --quick)")
    parser.add_argument("--prompt", default="the digit {}", help="prompt template, {} is the digit")
    parser.add_argument("--quick", action="store_true", help="one round, two images per digit")
    args = parser.parse_args()
    main(args.quick, args.model, args.data, args.per_digit, args.prompt)
