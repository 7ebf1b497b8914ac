"""The `mmfm` command: inspect models, caption, classify and embed files, generate images, from the shell.

Every subcommand is a thin layer over the Python API (`mmfm.create_model`, `mmfm.load`, `model.caption`,
`model.classify`, `model.embed`, `model.generate_image`); errors mmfm raises on purpose are printed as one
line, with exit code 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from PIL import Image

import mmfm
from mmfm.checkpoint import CONFIG_NAME
from mmfm.config import SCHEDULERS
from mmfm.data.digits import write_digits
from mmfm.errors import InputError, MMFMError
from mmfm.loader import from_converted, open_model
from mmfm.model import MultimodalModel
from mmfm.pipelines import image_grid
from mmfm.registry import read_config

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
YAML_EXTENSIONS = (".yaml", ".yml")

# A caption printed as-is could break the one-line-per-file output.
_LINE_ESCAPES = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r"})

T = TypeVar("T")

_MODEL_HELP = (
    "a checkpoint directory written by save_pretrained, or a preset name from `mmfm info --list` "
    "(a preset has random weights: useful for trying the command, not for real outputs)"
)

_MAIN_EPILOG = """\
examples:
  mmfm info --list                                  registered model presets
  mmfm info mmfm-tiny                               config and parameter counts of a preset
  mmfm caption --model out/ cat.jpg dog.wav         one caption per file
  mmfm classify --model out/ cat.jpg --labels cat,dog,bird
  mmfm embed --model out/ --text "a cat" --text "a dog" --out text.npy
  mmfm generate --model out/ --text "a red square" --out square.png
  mmfm data digits data/digits/                     write the demo dataset: digits, tones, manifests
  mmfm convert ast_dir/ out/ --from ast             weights of another library -> an mmfm checkpoint

`mmfm COMMAND --help` explains each command and its options.
"""

_INFO_EPILOG = """\
examples:
  mmfm info                      list the registered presets (same as --list)
  mmfm info mmfm-tiny            config and parameter counts of a preset
  mmfm info out/                 the same for a directory written by save_pretrained
  mmfm info my_recipe.yaml       the same for a YAML config or recipe

The config is printed as YAML (it can be saved and passed back to mmfm.create_model), then one row
per component with its parameter count, rounded (86.6M) and exact; tied weights count once.
"""

_CAPTION_EPILOG = f"""\
examples:
  mmfm caption --model out/ cat.jpg                 greedy caption of one image
  mmfm caption --model out/ a.png b.png clip.wav    images and audio in one call
  mmfm caption --model out/ cat.jpg --num-beams 4 --max-new-tokens 20
  mmfm caption --model out/ cat.jpg --do-sample --top-p 0.9 --seed 0
  mmfm caption --model out/ cat.jpg --prompt "a photo of"

Prints FILE<TAB>caption per file, in the order given. Tabs and line breaks inside a caption are printed
as \\t, \\n and \\r so that every file stays on one line. Images and audio are captioned as separate
batches. Images: {" ".join(IMAGE_EXTENSIONS)}; audio: {" ".join(AUDIO_EXTENSIONS)}.
"""

_CLASSIFY_EPILOG = """\
examples:
  mmfm classify --model out/ cat.jpg                        with the model's trained head
  mmfm classify --model out/ cat.jpg --labels cat,dog,bird  zero-shot against these labels
  mmfm classify --model out/ a.wav --labels-file labels.txt --top-k 3

Prints FILE, then the top-k classes as `label (probability)`, tab-separated, one line per file.
Zero-shot compares each file's embedding with the text embedding of every label (as CLIP does), so it
needs a model with a contrastive head; without labels the model needs a classify head.
"""

_EMBED_EPILOG = """\
examples:
  mmfm embed --model out/ --text "a cat" --text "a dog"   one JSON line per text
  mmfm embed --model out/ cat.jpg bark.wav --out emb.npy   a (2, E) float32 array in emb.npy

Embeddings are unit vectors, so a dot product is a cosine similarity, also across modalities. With
--out, row i of the .npy file (read it with numpy.load) is input i; --out is written exactly as named.
Without --out, each input prints {"input": ..., "embedding": [...]} on its own line.
"""

_GENERATE_EPILOG = """\
examples:
  mmfm generate --model out/ --text "a red square" --out square.png
  mmfm generate --model out/ --text "a seven" --text "a two" --num-images 4 --out grid.png
  mmfm generate --model out/ --audio bark.wav --out bark.png --seed 0
  mmfm generate --model out/ --image cat.png --num-images 3 --out variations.png
  mmfm generate --model out/ --text "a cat" --scheduler ddim --steps 50 --guidance 5 --out cat.png

Each --text, --audio or --image is one condition (repeat the option for more; use one kind per call).
One image is written to --out as it is; several make one grid image with a row per condition and
--num-images columns (a single condition's images are laid out as a square-ish grid). The image
format follows the extension of --out. Defaults for the sampler, steps and guidance come from the
model's image_gen config; --seed makes the images reproducible.
"""

_DATA_EPILOG = """\
examples:
  mmfm data digits data/digits/            write the digits demo dataset
  mmfm data digits data/digits/ --seed 1   other tones and another train/val split

Datasets are written as media files plus JSONL manifests (one example per line) that
mmfm.data.ManifestDataset reads; `mmfm data DATASET --help` describes each one.
"""

_DIGITS_EPILOG = """\
examples:
  mmfm data digits data/digits/
  mmfm data digits data/digits/ --seed 1

Writes scikit-learn's 1,797 handwritten 8x8 digits as OUT/images/NNNNN.png, a telephone (DTMF)
tone of each digit as OUT/audio/NNNNN.wav (16 kHz, random length, loudness and noise), and the
manifests OUT/train.jsonl and OUT/val.jsonl (a fixed, seeded 20% of the images held out). Each
line has the image, the audio, reference captions ("a handwritten seven", "the digit 7", ...) and
the label ("7"). Running it again rewrites the files.
"""


_TRAIN_EPILOG = """\
examples:
  mmfm train configs/train/demo.yaml                       the digits demo (after `mmfm data digits`)
  mmfm train my.yaml optim.lr=3e-4 steps=2000              override recipe fields
  mmfm train my.yaml resume=true                           continue from the run's latest checkpoint
  torchrun --nproc_per_node=2 -m mmfm train my.yaml        2 ranks, DDP or FSDP2 as the recipe says

Writes the run folder (out_dir): metrics.csv, curves.png, checkpoints/step-NNNNNN/ (the last
keep_last of them) and final/ (a model directory for mmfm.load). SIGINT or SIGTERM stops after the
current step with a checkpoint; the exit code is then 128 + the signal number.
"""

_EVAL_EPILOG = """\
examples:
  mmfm eval --model runs/demo/final --data data/digits/val.jsonl
  mmfm eval --model runs/demo/final --data data/digits/val.jsonl --samples 5 --out metrics.json

The tasks come from --config, else from the run folder's train_config.yaml, else from the model's
heads and the manifest's fields. Prints one `name: value` line per metric.
"""


_CONVERT_EPILOG = """\
examples:
  mmfm convert hf_ast/ out/ --from ast                      a Hugging Face AST directory -> out/
  mmfm convert vit.safetensors out/ --from timm --model-name vit_base_patch16_224
  mmfm convert hf_ast/ out/ --from ast --base mmfm-small    the other components from mmfm-small
  mmfm convert pipeline/ out/ --from diffusers              a diffusers UNet (+ vae/, scheduler/) -> image_gen

SRC is read in its own library's format (safetensors memory-mapped; .pt/.bin/.pth only with
torch.load(weights_only=True), so nothing is unpickled) and remapped to mmfm keys. The components the
source does not bring (the backbone and heads, when it is one tower) come from --base with fresh
weights, and are listed. OUT/ gets config.yaml + model.safetensors: load it with mmfm.load("OUT/").
"""


def main(argv: list[str] | None = None) -> int:
    """Runs the `mmfm` command line.

    Args:
        argv: the arguments after the program name; None reads `sys.argv[1:]`.

    Returns:
        The exit code: 0 on success, 2 for a usage error or an error mmfm raises on purpose.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        args.run(args)
    except MMFMError as e:
        print(f"mmfm: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `mmfm` and all its subcommands."""
    parser = argparse.ArgumentParser(
        prog="mmfm",
        description="Multimodal foundation models: caption, classify, embed and generate images and audio.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mmfm {mmfm.__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    def command(
        name: str, summary: str, epilog: str, run: Callable[[argparse.Namespace], None]
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=summary, description=summary, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sub.set_defaults(run=run)
        return sub

    info = command("info", "Show a model's config and parameter counts, or list the presets.", _INFO_EPILOG, _info)
    info.add_argument("model", nargs="?", metavar="NAME|DIR|YAML", help="a preset name, checkpoint directory or YAML")
    info.add_argument("--list", action="store_true", help="list the registered presets")

    caption = command("caption", "Write a caption for each image or audio file.", _CAPTION_EPILOG, _caption)
    _add_model_and_files(caption)
    caption.add_argument("--prompt", help="text every caption starts from (not printed)")
    caption.add_argument("--max-new-tokens", type=int, metavar="N", help="caption length limit in tokens")
    caption.add_argument("--num-beams", type=int, metavar="N", help="beam search width (default: 1, greedy)")
    caption.add_argument("--do-sample", action="store_true", help="sample tokens instead of taking the most likely")
    caption.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (default: 1.0)")
    caption.add_argument("--top-k", type=int, metavar="K", help="sample among the k likeliest tokens (default: 0, all)")
    caption.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass (default: 1.0, all)")
    caption.add_argument("--seed", type=int, metavar="N", help="seed for --do-sample, for reproducible captions")

    summary = "Classify each image or audio file, with the trained head or zero-shot against labels."
    classify = command("classify", summary, _CLASSIFY_EPILOG, _classify)
    _add_model_and_files(classify)
    labels = classify.add_mutually_exclusive_group()
    labels.add_argument("--labels", metavar="A,B,C", help="comma-separated labels for zero-shot classification")
    labels.add_argument("--labels-file", metavar="FILE", help="zero-shot labels, one per line (blank lines skipped)")
    classify.add_argument("--top-k", type=_positive_int, default=5, metavar="K", help="classes shown (default: 5)")

    embed = command("embed", "Embed texts, images or audio files as unit vectors.", _EMBED_EPILOG, _embed)
    embed.add_argument("--model", required=True, metavar="NAME|DIR", help=_MODEL_HELP)
    embed.add_argument("files", nargs="*", metavar="FILE", help="image or audio files (by extension)")
    embed.add_argument("--text", action="append", metavar="TEXT", help="a text to embed; repeat for more")
    embed.add_argument("--out", metavar="FILE.npy", help="write an (N, E) float32 .npy array instead of JSON lines")

    summary = "Generate images from texts, audio files or images (variations)."
    generate = command("generate", summary, _GENERATE_EPILOG, _generate)
    generate.add_argument("--model", required=True, metavar="NAME|DIR", help=_MODEL_HELP)
    conditions = generate.add_mutually_exclusive_group(required=True)
    conditions.add_argument("--text", action="append", metavar="TEXT", help="a prompt; repeat for more")
    conditions.add_argument("--audio", action="append", metavar="FILE", help="an audio file; repeat for more")
    conditions.add_argument("--image", action="append", metavar="FILE", help="an image to vary; repeat for more")
    generate.add_argument("--out", required=True, metavar="PATH", help="the image (or grid) to write: .png, .jpg, ...")
    generate.add_argument("--num-images", type=_positive_int, default=1, metavar="N", help="per condition (default: 1)")
    generate.add_argument("--steps", type=int, metavar="N", help="denoising steps (default: the model's)")
    generate.add_argument("--guidance", type=float, metavar="G", help="classifier-free guidance scale, 1 for none")
    generate.add_argument("--scheduler", choices=list(SCHEDULERS), help="the sampler (default: the model's)")
    generate.add_argument("--seed", type=int, metavar="N", help="seed for reproducible images")

    summary = "Train or fine-tune a model from a YAML recipe (also one rank of a torchrun job)."
    train = command("train", summary, _TRAIN_EPILOG, _train)
    train.add_argument("config", metavar="CONFIG", help="a training recipe (YAML), e.g. configs/train/demo.yaml")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe fields to change (optim.lr=3e-4)")

    summary = "Compute held-out metrics of a saved model on a manifest."
    evaluate = command("eval", summary, _EVAL_EPILOG, _eval)
    evaluate.add_argument("--model", required=True, metavar="DIR", help="a directory written by save_pretrained")
    evaluate.add_argument("--data", required=True, metavar="MANIFEST", help="a JSONL manifest of held-out examples")
    evaluate.add_argument(
        "--config", metavar="RECIPE", help="take the tasks from this training recipe (default: the run's own)"
    )
    evaluate.add_argument("--samples", type=int, default=0, metavar="N", help="also print N sample outputs per task")
    evaluate.add_argument("--batch-size", type=_positive_int, default=64, metavar="N", help="default: 64")
    evaluate.add_argument("--out", metavar="FILE.json", help="also write the metrics as JSON")

    summary = "Convert weights of another library (timm, open_clip, Hugging Face, AST, ...) into an mmfm checkpoint."
    conv = command("convert", summary, _CONVERT_EPILOG, _convert)
    conv.add_argument("src", metavar="SRC", help="the source checkpoint: a file or directory in its library's format")
    conv.add_argument("out", metavar="OUT", help="the directory to write config.yaml + model.safetensors into")
    conv.add_argument("--from", dest="source", required=True, metavar="SOURCE", help="the source library's format")
    conv.add_argument("--model-name", metavar="NAME", help="the source's architecture name, where SRC does not say")
    conv.add_argument(
        "--base", default="mmfm-base", metavar="PRESET", help="preset for the parts SRC lacks (default: mmfm-base)"
    )

    summary = "Write a built-in dataset as files and JSONL manifests."
    data = commands.add_parser(
        "data",
        help=summary,
        description=summary,
        epilog=_DATA_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    datasets = data.add_subparsers(dest="dataset", title="datasets", metavar="DATASET", required=True)
    summary = "Write the handwritten digits demo dataset: images, DTMF tones, captions, labels."
    digits = datasets.add_parser(
        "digits",
        help=summary,
        description=summary,
        epilog=_DIGITS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    digits.set_defaults(run=_data_digits)
    digits.add_argument("out", metavar="OUT", help="the directory to write into (created if missing)")
    digits.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the tones and the split (default: 0)")
    return parser


def _add_model_and_files(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="NAME|DIR", help=_MODEL_HELP)
    parser.add_argument("files", nargs="+", metavar="FILE", help="image or audio files (told apart by extension)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# ---- commands ----


def _info(args: argparse.Namespace) -> None:
    if args.list or args.model is None:
        print("\n".join(mmfm.list_models()))
        return
    # Counting needs shapes only: the meta device allocates and initialises nothing, so large models are instant.
    with torch.device("meta"):
        if _is_checkpoint(args.model):
            model = MultimodalModel(read_config(Path(args.model) / CONFIG_NAME))
        else:
            model = mmfm.create_model(args.model)
    counts = model.parameter_counts()
    counts["total"] = sum(counts.values())
    width = max(map(len, counts))
    exact_width = len(f"{counts['total']:,}")
    print("# config")
    print(yaml.safe_dump(model.config.to_dict(), sort_keys=False), end="")
    print("\n# parameters")
    print(f"{'component':<{width}}  {'params':>7}  {'exact':>{exact_width}}")
    for name, count in counts.items():
        print(f"{name:<{width}}  {_human(count):>7}  {count:>{exact_width},}")


def _caption(args: argparse.Namespace) -> None:
    groups = _group_by_modality(args.files)
    options = {
        "prompt": args.prompt,
        "do_sample": args.do_sample,
        "max_new_tokens": args.max_new_tokens,
        "num_beams": args.num_beams,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    options = {k: v for k, v in options.items() if v is not None}
    model = _load_model(args.model)
    captions = _run_grouped(args.files, groups, lambda inputs: model.caption(**inputs, **options))
    for path, text in zip(args.files, captions):
        print(f"{path}\t{text.translate(_LINE_ESCAPES)}")


def _classify(args: argparse.Namespace) -> None:
    groups = _group_by_modality(args.files)
    labels = _read_labels(args.labels, args.labels_file)
    model = _load_model(args.model)
    tops = _run_grouped(args.files, groups, lambda inputs: model.classify(**inputs, labels=labels).top(args.top_k))
    for path, top in zip(args.files, tops):
        print("\t".join([path, *(f"{label} ({prob:.4f})" for label, prob in top)]))


def _embed(args: argparse.Namespace) -> None:
    if bool(args.text) == bool(args.files):
        raise InputError("embed takes either --text (one or more) or FILE arguments, not both and not neither")
    inputs = args.text or args.files
    groups = {"text": list(range(len(inputs)))} if args.text else _group_by_modality(args.files)
    model = _load_model(args.model)
    rows = _run_grouped(inputs, groups, lambda batch: model.embed(**batch))
    embeddings = torch.stack(rows).float().numpy()  # (N, E)
    if args.out is None:
        for item, row in zip(inputs, embeddings.tolist()):
            print(json.dumps({"input": item, "embedding": row}))
        return
    try:
        with open(args.out, "wb") as f:
            np.save(f, embeddings)
    except OSError as e:
        raise InputError(f"--out {args.out}: cannot write the embeddings ({e.strerror})") from None
    print(f"mmfm: wrote {embeddings.shape[0]}x{embeddings.shape[1]} float32 embeddings to {args.out}", file=sys.stderr)


def _generate(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.suffix.lower() not in Image.registered_extensions():
        raise InputError(f"--out {args.out}: unknown image extension '{out.suffix}' (try .png)")
    conditions = {"text": args.text, "audio": args.audio, "images": args.image}
    model = _load_model(args.model)
    images = model.generate_image(
        **{k: v for k, v in conditions.items() if v},
        num_images=args.num_images,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        scheduler=args.scheduler,
        seed=args.seed,
        progress=sys.stderr.isatty(),
    )
    count = len(next(v for v in conditions.values() if v))
    columns = args.num_images if count > 1 else math.ceil(math.sqrt(len(images)))
    picture = images[0] if len(images) == 1 else image_grid(images, columns)
    try:
        picture.save(out)
    except (OSError, ValueError) as e:
        raise InputError(f"--out {args.out}: cannot write the image ({e})") from None
    what = "1 image" if len(images) == 1 else f"a grid of {len(images)} images"
    print(f"mmfm: wrote {what} to {args.out}", file=sys.stderr)


def _data_digits(args: argparse.Namespace) -> None:
    try:
        out = write_digits(args.out, seed=args.seed)
    except OSError as e:
        raise InputError(f"{args.out}: cannot write the dataset ({e.strerror or e})") from None
    print(f"wrote the digits dataset to {out}")
    for split in ("train", "val"):
        manifest = out / f"{split}.jsonl"
        count = sum(1 for line in manifest.read_text().splitlines() if line.strip())
        print(f"{split:<5}  {count:>4} examples  {manifest}")


# ---- helpers ----


def _convert(args: argparse.Namespace) -> None:
    from mmfm.convert import convert, get_converter, list_sources

    if args.source not in list_sources():
        raise InputError(f"--from {args.source}: unknown source (known: {', '.join(list_sources())})")
    kwargs = {}
    if args.model_name is not None:
        if "model_name" not in inspect.signature(get_converter(args.source)).parameters:
            raise InputError(f"--model-name: the '{args.source}' converter reads the architecture from SRC itself")
        kwargs["model_name"] = args.model_name
    converted = convert(args.source, args.src, **kwargs)
    model, fresh = from_converted(converted, args.base, f"{args.src} ({args.source})")
    model.save_pretrained(args.out)
    print(f"mmfm: wrote {args.out} ({args.source} weights from {args.src})", file=sys.stderr)
    if fresh:
        print(f"mmfm: freshly initialised from {args.base}: {', '.join(fresh)}", file=sys.stderr)


def _train(args: argparse.Namespace) -> None:
    from mmfm.train import TrainConfig, parse_overrides, train

    final = train(TrainConfig.from_file(args.config, parse_overrides(args.overrides)))
    if final is not None:
        print(f"model: {final}")


def _eval(args: argparse.Namespace) -> None:
    from mmfm.train.evaluate import evaluate_manifest

    metrics, samples = evaluate_manifest(args.model, args.data, args.config, args.batch_size, args.samples)
    for name, value in metrics.items():
        print(f"{name}: {value:.4f}")
    for line in samples:
        print(line.translate(_LINE_ESCAPES))
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2))


def _is_checkpoint(spec: str) -> bool:
    """Whether a NAME|DIR|YAML argument means a checkpoint directory: one that exists, or anything written as a path.

    A path to a missing directory then fails as a missing checkpoint rather than as an unknown preset name.
    """
    path = Path(spec)
    return path.is_dir() or (path.suffix not in YAML_EXTENSIONS and ("/" in spec or os.sep in spec))


def _load_model(spec: str) -> MultimodalModel:
    """A saved checkpoint (`mmfm.load`), or a preset or YAML config with random weights (`mmfm.create_model`)."""
    model, random = open_model(spec)
    if not random:
        return model
    print(
        f"mmfm: warning: '{spec}' builds a model with random weights, so its outputs mean nothing; "
        "pass a directory written by save_pretrained for a trained model",
        file=sys.stderr,
    )
    return model


def _group_by_modality(files: Sequence[str]) -> dict[str, list[int]]:
    """Positions of the image and of the audio files, keyed by the model API's argument name ("images", "audio")."""
    groups: dict[str, list[int]] = {}
    for i, path in enumerate(files):
        suffix = Path(path).suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            groups.setdefault("images", []).append(i)
        elif suffix in AUDIO_EXTENSIONS:
            groups.setdefault("audio", []).append(i)
        else:
            raise InputError(
                f"{path}: unknown file type '{suffix}'; images: {' '.join(IMAGE_EXTENSIONS)}; "
                f"audio: {' '.join(AUDIO_EXTENSIONS)}"
            )
    return groups


def _run_grouped(
    inputs: Sequence[Any], groups: dict[str, list[int]], run: Callable[[dict[str, list[Any]]], Sequence[T]]
) -> list[T]:
    """Calls `run` once per group as a batch (`run({"images": [...]})`) and returns its results in input order."""
    results: list[Any] = [None] * len(inputs)
    for key, positions in groups.items():
        for i, result in zip(positions, run({key: [inputs[i] for i in positions]})):
            results[i] = result
    return results


def _read_labels(labels: str | None, labels_file: str | None) -> list[str] | None:
    """Zero-shot labels from `--labels a,b,c` or a one-per-line `--labels-file`; None for the trained head."""
    if labels is not None:
        return [label.strip() for label in labels.split(",")]
    if labels_file is None:
        return None
    try:
        lines = Path(labels_file).read_text().splitlines()
    except OSError as e:
        raise InputError(f"--labels-file {labels_file}: cannot be read ({e.strerror})") from None
    found = [line.strip() for line in lines if line.strip()]
    if not found:
        raise InputError(f"--labels-file {labels_file}: has no labels (expected one per line)")
    return found


def _human(count: int) -> str:
    """A parameter count to one decimal of thousands, millions or billions: 86_567_656 -> "86.6M"."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if round(count / scale, 1) >= 1:
            return f"{count / scale:.1f}{unit}"
    return str(count)
