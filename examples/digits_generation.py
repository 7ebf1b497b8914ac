"""Text->digit and sound->digit generation of the digits demo, judged by an independent classifier.

    python examples/digits_generation.py --model runs/demo/final --data data/digits --out runs/demo

For each digit 0-9 the model draws `--per-digit` images from the prompt "the digit {d}" (text) and one image from
each of `--per-digit` held-out telephone tones of that digit (sound), with DPM-Solver++ at `--steps` steps. A
`DigitsJudge` (an SVM fitted on the real training images) reads every image: accuracy is the fraction read as the
intended digit. Diversity is the mean pairwise RMS distance among one digit's images, averaged over digits, beside
the same for as many real held-out images of each digit at the generated size. The scores are `mmfm eval`'s
(`mmfm.eval.generation.generation_metrics`); `mmfm eval` itself, which `make demo` ends with, draws one digit per
held-out caption and tone instead of from "the digit {d}", judges them with the built-in judge, and leaves out the
real images' baseline and this side-by-side sheet.

Writes OUT/generated.png (one row per digit: text samples, a grey gap, sound samples) and OUT/generation.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

import mmfm
from mmfm.data import ManifestDataset
from mmfm.data.judge import DigitsJudge
from mmfm.eval.generation import generation_metrics
from mmfm.pipelines import image_grid, to_pil

DIGITS = range(10)
GRID_CELL = 40  # pixels per grid cell, at least: small images are enlarged (nearest neighbour)


def held_out_by_digit(manifest: Path, per_digit: int) -> dict[int, list[dict]]:
    """The first `per_digit` examples of each digit in a manifest (each needs "label", "image" and "audio")."""
    items = ManifestDataset(manifest)
    chosen: dict[int, list[dict]] = {d: [] for d in DIGITS}
    for i in range(len(items)):
        item = items[i]
        group = chosen[int(item["label"])]
        if len(group) < per_digit:
            group.append(item)
    short = [d for d, group in chosen.items() if len(group) < per_digit]
    if short:
        raise SystemExit(f"{manifest} has fewer than {per_digit} examples of digit(s) {short}")
    return chosen


def real_at_generated_size(model, paths: list[str]) -> list[Image.Image]:
    """Real images as the image_gen head was trained on them: greyscale, resized to its image size."""
    with torch.no_grad():
        targets = model.image_gen_targets(model.processors["image"](paths).to(model.device))
    return to_pil((targets + 1) / 2)


def scores(images: list[Image.Image], digits: list[int], judge: DigitsJudge) -> dict[str, float]:
    """{"accuracy": read as their digit, "diversity": within a digit, averaged} (`mmfm eval`'s way of scoring)."""
    metrics, _ = generation_metrics(images, digits, judge)
    return {"accuracy": metrics["judged_accuracy"], "diversity": metrics["diversity"]}


def grid(text_images: list[Image.Image], sound_images: list[Image.Image], per_digit: int, columns: int) -> Image.Image:
    """One row per digit: `columns` text samples, a grey cell, `columns` sound samples.

    Each sample gets a one-pixel black margin (the digits fill their frame, so neighbours would touch), and the
    sheet is enlarged by nearest neighbour to about `GRID_CELL` pixels per cell.
    """
    cells = []
    for d in DIGITS:
        row = slice(d * per_digit, d * per_digit + columns)
        cells += [*text_images[row], None, *sound_images[row]]
    side = text_images[0].width
    gap = Image.new(text_images[0].mode, (side, side), 128)
    sheet = image_grid([ImageOps.expand(gap if c is None else c, border=1, fill=0) for c in cells], 2 * columns + 1)
    scale = max(1, -(-GRID_CELL // (side + 2)))
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.Resampling.NEAREST)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/demo/final", help="a saved model with an image_gen head")
    parser.add_argument("--data", default="data/digits", help="the folder `mmfm data digits` wrote")
    parser.add_argument("--out", default="runs/demo", help="where generated.png and generation.json go")
    parser.add_argument("--per-digit", type=int, default=10, help="images per digit and per modality")
    parser.add_argument("--columns", type=int, default=5, help="samples per modality in each grid row")
    parser.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps")
    parser.add_argument("--guidance-scale", type=float, help="default: the model's image_gen.guidance_scale")
    parser.add_argument("--prompt", default="the digit {}", help="text prompt template; {} is the digit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 2 <= args.columns <= args.per_digit:
        parser.error(f"--columns must be between 2 and --per-digit ({args.per_digit}), got {args.columns}")

    data, out = Path(args.data), Path(args.out)
    model = mmfm.load(args.model).eval()
    judge = DigitsJudge.from_manifest(data / "train.jsonl")
    held_out = held_out_by_digit(data / "val.jsonl", args.per_digit)
    digits = [d for d in DIGITS for _ in range(args.per_digit)]
    sampling = {"scheduler": "dpmsolver++", "num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}

    start = time.perf_counter()
    prompts = [args.prompt.format(d) for d in DIGITS]
    text_images = model.generate_image(text=prompts, num_images=args.per_digit, seed=args.seed, **sampling)
    tones = [item["audio"] for d in DIGITS for item in held_out[d]]
    sound_images = model.generate_image(audio=tones, seed=args.seed, **sampling)
    seconds = time.perf_counter() - start
    real = real_at_generated_size(model, [item["image"] for d in DIGITS for item in held_out[d]])

    report = {
        "model": str(args.model),
        "sampler": f"dpmsolver++, {args.steps} steps",
        "guidance_scale": model.config.image_gen.guidance_scale if args.guidance_scale is None else args.guidance_scale,
        "images_per_digit": args.per_digit,
        "text_prompt": args.prompt,
        "text_to_image": scores(text_images, digits, judge),
        "sound_to_image": scores(sound_images, digits, judge),
        "real_images": scores(real, digits, judge),
        "sampling_seconds": round(seconds, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    grid(text_images, sound_images, args.per_digit, args.columns).save(out / "generated.png")
    (out / "generation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{2 * len(digits)} images in {seconds:.0f} s (DPM-Solver++, {args.steps} steps), "
        f"judged by an SVM fitted on {data / 'train.jsonl'}"
    )
    print(f"{'':16}{'accuracy':>9}{'diversity':>11}")
    for name, key in (
        ("text -> image", "text_to_image"),
        ("sound -> image", "sound_to_image"),
        ("real, held out", "real_images"),
    ):
        print(f"{name:16}{report[key]['accuracy']:>9.1%}{report[key]['diversity']:>11.3f}")
    print(f"samples: {out / 'generated.png'}, numbers: {out / 'generation.json'}")
    return report


if __name__ == "__main__":
    main()
