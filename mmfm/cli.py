"""The `mmfm` command: inspect models; caption, classify and embed files; generate images and text; chat.

Every subcommand is a thin layer over the Python API (`mmfm.loader.open_model`, `mmfm.pipelines`); errors mmfm
raises on purpose are printed as one line, with exit code 2. The parser is built without torch or the model
code, which each command imports when it runs, so `mmfm --version` and `mmfm --help` answer at once.

The inference commands (caption, classify, embed, generate-image) share their options: `--model` (a preset
name, a shipped config name, a checkpoint folder, a pretrained tag or an `hf-hub:org/name` repository),
`--device`, `--dtype`, `--batch-size` and `--json`; their inputs are files or folders (walked recursively,
files taken by extension). A progress bar is drawn on stderr when stderr is a terminal and there is more than
one batch; stdout only ever holds the results. `generate-text` takes the same options and PROMPT texts. `chat`
takes --model, --device, --dtype and generate-text's decoding options, and talks with the model about images and
sounds; its conversation loop, which `generate-text --chat` shares, lives in `mmfm.cli_chat`.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mmfm
from mmfm.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BATCH_WAIT_MS,
    DEFAULT_SERVE_BATCH_SIZE,
    DTYPE_NAMES,
    MEDIA,
    SCHEDULERS,
    read_small_file,
)
from mmfm.errors import ConfigError, InputError, MMFMError
from mmfm.inputs import expand_inputs, printable, quoted

if TYPE_CHECKING:
    from mmfm.model import MultimodalModel

# A caption printed as-is could break the one-line-per-file output.
_LINE_ESCAPES = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r"})

# The largest --labels-file read (one label per line; ImageNet-21k's 21,843 names take about 400 KB). A bigger file
# is refused rather than read, as are folders, FIFOs and devices (/dev/zero would be read until memory ran out).
MAX_LABELS_FILE_BYTES = 4 * 1024 * 1024

# Options whose values are text for the model (read as UTF-8), as opposed to file names (any bytes the OS allows).
_TEXT_OPTIONS = {
    "text": "--text",
    "prompt": "--prompt",
    "prompts": "PROMPT",
    "system": "--system",
    "stop": "--stop",
    "labels": "--labels",
    "overrides": "override",
}

# `mmfm export --to FORMAT`: the module and function that write each format (imported when the command runs).
EXPORTERS = {"hf_llama": ("mmfm.convert.hf_llama", "export_hf_llama")}

_MODEL_HELP = (
    "a preset or shipped config name (`mmfm info --list`; random weights: for trying the command, not for real "
    "outputs), a checkpoint folder written by save_pretrained, a pretrained tag, or hf-hub:org/name"
)
_DEVICE_HELP = "where the model runs: cpu (default), cuda, cuda:1, mps"
_DTYPE_HELP = f"the parameters' dtype: {', '.join(DTYPE_NAMES)} (default: {DTYPE_NAMES[0]}; float16: GPUs only)"
_JSON_HELP = "print one JSON object per input instead of plain text"
_FILES_HELP = "image or audio files (told apart by extension), or folders of them (searched recursively)"

_MAIN_EPILOG = """\
examples:
  mmfm info --list                                  presets, shipped configs and pretrained tags
  mmfm info --model mmfm-tiny                       config and parameter counts of a preset
  mmfm caption --model out/ cat.jpg dog.wav         one caption per file
  mmfm caption --model out/ photos/ --device cuda --dtype bfloat16 --json
  mmfm classify --model out/ cat.jpg --labels cat,dog,bird
  mmfm embed --model out/ --text "a cat" --text "a dog" --out text.npy
  mmfm generate-image --model out/ --text "a red square" --out square.png
  mmfm generate-text --model llm/ "The capital of France is"    a continuation, streamed
  mmfm generate-text --model llm/ --chat                        a conversation on the terminal
  mmfm chat --model vlm/ --image cat.jpg                        a conversation about an image (or sound)
  mmfm serve --model vlm/                           a web app and an OpenAI-compatible API on port 7860
  mmfm data digits data/digits/                     write the demo dataset: digits, tones, manifests
  mmfm data digits-chat data/chat/                  the chat demo's data: conversations about digits
  mmfm convert ast_dir/ out/ --from ast             weights of another library -> an mmfm checkpoint
  mmfm convert model.gguf llm/ --from gguf          a Llama-family LLM (GGUF file or HF folder) -> mmfm
  mmfm export llm/ hf/ --to hf_llama                an mmfm language model -> a Hugging Face folder

`mmfm COMMAND --help` explains each command and its options. The inference commands (caption, classify,
embed, generate-image, generate-text) all take --model, --device, --dtype, --batch-size and --json; their
inputs are files or folders (generate-image: --text, --audio or --image; generate-text: PROMPT texts).
chat reads the conversation from stdin and takes --model, --device and --dtype.
"""

_INFO_EPILOG = """\
examples:
  mmfm info --list                       presets, shipped config names and pretrained tags, by section
  mmfm info --model mmfm-tiny            config and parameter counts of a preset
  mmfm info --model mmfm-tiny-digits     the same for a shipped config (configs/models/NAME.yaml)
  mmfm info --model out/                 the same for a folder written by save_pretrained
  mmfm info --model my_recipe.yaml       the same for a YAML config or recipe

Without --model, lists as --list does. The config is printed as YAML (it can be saved and passed back to
mmfm.create_model), then one row per component with its parameter count, rounded (86.6M) and exact; tied
weights count once. Architectures and checkpoint folders are counted from their config alone, without
allocating weights; a pretrained tag or hub repository is loaded.
"""

_INPUTS_NOTE = f"""\
FILE arguments may be folders: every file below them whose extension is known is taken, in sorted order
(hidden files and folders are skipped). Images: {" ".join(MEDIA["image"].extensions)}; audio:
{" ".join(MEDIA["audio"].extensions)}. A progress bar is drawn on stderr when it is a terminal and the
inputs need more than one batch (--batch-size, default {DEFAULT_BATCH_SIZE})."""

_CAPTION_EPILOG = f"""\
examples:
  mmfm caption --model out/ cat.jpg                 greedy caption of one image
  mmfm caption --model out/ a.png b.png clip.wav    images and audio in one call
  mmfm caption --model out/ photos/ --json          every image and clip below photos/, as JSON lines
  mmfm caption --model out/ cat.jpg --num-beams 4 --max-new-tokens 20
  mmfm caption --model out/ cat.jpg --do-sample --top-p 0.9 --seed 0
  mmfm caption --model out/ cat.jpg --prompt "a photo of"

Prints FILE<TAB>caption per file, in input order. Tabs and line breaks inside a caption are printed as \\t,
\\n and \\r so that every file stays on one line. With --json each file prints
{{"input": FILE, "caption": TEXT}} on its own line instead. Images and audio are captioned separately.
{_INPUTS_NOTE}
"""

_CLASSIFY_EPILOG = f"""\
examples:
  mmfm classify --model out/ cat.jpg                        with the model's trained head
  mmfm classify --model out/ cat.jpg --labels cat,dog,bird  zero-shot against these labels
  mmfm classify --model out/ clips/ --labels-file labels.txt --top 3 --json

Prints FILE, then the --top classes as `label (probability)`, tab-separated, one line per file. With --json
each file prints {{"input": FILE, "label": BEST, "top": [{{"label": L, "probability": P}}, ...]}} instead.
Zero-shot compares each file's embedding with the text embedding of every label (as CLIP does), so it
needs a model with a contrastive head; without labels the model needs a classify head.
{_INPUTS_NOTE}
"""

_EMBED_EPILOG = f"""\
examples:
  mmfm embed --model out/ --text "a cat" --text "a dog"   one JSON line per text
  mmfm embed --model out/ cat.jpg bark.wav --out emb.npy   a (2, E) float32 array in emb.npy
  mmfm embed --model out/ photos/ --device cuda --out emb.npy --json

Embeddings are unit vectors, so a dot product is a cosine similarity, also across modalities. With
--out, row i of the .npy file (read it with numpy.load) is input i; --out is written exactly as named, and
--json then prints {{"input": ..., "out": FILE.npy, "row": i}} per input. Without --out, each input prints
{{"input": ..., "embedding": [...]}} on its own line (with or without --json).
{_INPUTS_NOTE}
"""

_GENERATE_EPILOG = """\
examples:
  mmfm generate-image --model out/ --text "a red square" --out square.png
  mmfm generate-image --model out/ --text "a seven" --text "a two" --num-images 4 --out grid.png
  mmfm generate-image --model out/ --audio bark.wav --out bark.png --seed 0
  mmfm generate-image --model out/ --image cat.png --num-images 3 --out variations.png
  mmfm generate-image --model out/ --text "a cat" --scheduler ddim --num-inference-steps 50 \\
      --guidance-scale 5 --device cuda --dtype bfloat16 --out cat.png

Each --text, --audio or --image is one condition (repeat the option for more; use one kind per call);
--audio and --image also take folders, walked as the other commands walk them. One image is written to
--out as it is; several make one grid image with a row per condition and --num-images columns (a single
condition's images are laid out as a square-ish grid). The image format follows the extension of --out.
With --json each condition prints {"input": ..., "out": PATH, "cells": [[row, column], ...],
"cell_size": [width, height]}: where its images are in the written file. Defaults for the sampler, steps
and guidance come from the model's image_gen config; --seed makes the images reproducible. `mmfm generate`
is the deprecated name of this command, as are --steps and --guidance of its options.
"""

_DATA_EPILOG = """\
examples:
  mmfm data digits data/digits/            write the digits demo dataset
  mmfm data digits data/digits/ --seed 1   other tones and another train/val split
  mmfm data digits-chat data/chat/         conversations about digit images, spoken digits and tones

Datasets are written as media files plus JSONL manifests: one example a line, which
mmfm.data.ManifestDataset reads, or (digits-chat's train.jsonl and val.jsonl) one conversation a
line. `mmfm data DATASET --help` describes each one.
"""

_DIGITS_EPILOG = """\
examples:
  mmfm data digits data/digits/
  mmfm data digits data/digits/ --seed 1

Writes scikit-learn's 1,797 handwritten 8x8 digits as OUT/images/NNNNN.png, a telephone (DTMF)
tone of each digit as OUT/audio/NNNNN.wav (16 kHz, random length, loudness and noise), and the
manifests OUT/train.jsonl and OUT/val.jsonl (a fixed, seeded 20% of the images held out). Each
line has the image, the audio, captions of the image ("a handwritten seven", "the digit 7", ...),
captions of the tone, which audio captioning trains on ("the keypad tone for 7", "a telephone key
tone, seven", ...), and the label ("7"). Running it again rewrites the files.
"""

_DIGITS_CHAT_EPILOG = """\
examples:
  mmfm data digits-chat data/chat/
  mmfm data digits-chat data/chat/ --seed 1

Writes the chat demo's data: the 1,797 handwritten digits as OUT/images/NNNNN.png, spoken digits
("zero".."nine", 16 kHz) by 12 training and 3 held-out espeak-ng voices as OUT/speech/VOICE_DIGIT_K.wav,
telephone (DTMF) tones as OUT/tones/NNNNN.wav, and two kinds of manifests:
  OUT/train.jsonl, OUT/val.jsonl
      one conversation a line: {"messages": [{"role": "user", "content": "<image>\\nWhich digit is this?"},
      {"role": "assistant", "content": "It is a seven."}], "images": [...], "audio": [...],
      "family": "image_digit", "id": "train-00000"}; <image> and <audio> are filled in order from "images"
      and "audio"
  OUT/towers_train.jsonl, OUT/towers_val.jsonl
      one image or sound and its label a line, for pretraining the image and audio encoders
Validation holds out 20% of the images, the voices, the tones and the question phrasings, and has
the same number of conversations in every family. Running it again rewrites the files.
"""


_SERVE_EPILOG = """\
examples:
  mmfm serve --model vlm/                                   http://127.0.0.1:7860: the web app, and the API at /v1
  mmfm serve --model vlm/ --allowed-dir ~/pictures          requests may name files in this folder
  mmfm serve --model vlm/ --host 0.0.0.0 --api-key s3cret   reachable from other machines, behind a key
  curl http://127.0.0.1:7860/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "NAME", "messages": [{"role": "user", "content": "Hello"}]}'

One process serves the Gradio web app at "/" (a tab per thing the model can do: chat, caption, classify,
search, generate) and an OpenAI-compatible API on the same port: POST /v1/chat/completions (streamed with
"stream": true), /v1/embeddings, /v1/images/generations and GET /v1/models; the model's name is its
config name (GET /v1/models). Chat requests that arrive together are answered in one batch of up to
--max-batch-size, which waits up to --batch-wait-ms for more to join it. Requests read media from data:
URLs, or from files inside an --allowed-dir (none by default). With --api-key (or MMFM_API_KEY in the
environment) every request needs 'Authorization: Bearer KEY'; a browser opens http://HOST:PORT/?api_key=KEY
once and keeps a cookie.
Binding anywhere but localhost prints a warning. Ctrl-C stops the server.
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
  mmfm eval --model runs/demo/final --data data/digits/val.jsonl --out runs/demo/eval
  mmfm eval --model runs/demo/final --data data/digits/val.jsonl --samples 5 --out metrics.json
  mmfm eval --model runs/demo/final --data data/digits/val.jsonl --metrics bleu,cider_d,recall
  mmfm eval --model clip/ --data photos/ --labels cat,dog        zero-shot over photos/cat/, photos/dog/
  mmfm eval --compare runs/a/eval runs/b/eval --out runs/compare
  mmfm eval --model mmfm-test --data data/digits/val.jsonl   a preset: random weights, chance-level metrics

--data is a JSONL manifest or a class folder (DIR/<class>/*.png or *.wav: zero-shot classification through
the contrastive head's prompt templates, with --labels or every folder name). A manifest's tasks come from
--config, else from the run folder's train_config.yaml, else from the model's heads and the manifest's
fields. Prints a table of the metrics, task by task (per-class accuracies as the lowest three); --out DIR
writes eval.json (every number, the settings, sha256 fingerprints of the model and the data, the mmfm
version), eval.md (a table per task) and PNG figures; --out FILE.json writes the JSON alone. --compare
prints every metric of several eval.json files (or folders holding one) side by side with the deltas
against the first; "-" marks a metric a run lacks.

metrics (--metrics, comma-separated; default: all):
{metrics}
"""


_CONVERT_EPILOG = """\
examples:
  mmfm convert hf_ast/ out/ --from ast                      a Hugging Face AST directory -> out/
  mmfm convert vit.safetensors out/ --from timm --model-name vit_base_patch16_224
  mmfm convert hf_ast/ out/ --from ast --base mmfm-small    the other components from mmfm-small
  mmfm convert pipeline/ out/ --from diffusers              a diffusers UNet (+ vae/, scheduler/) -> image_gen
  mmfm convert SmolLM2-135M/ llm/ --from hf_llama           a llama / mistral / qwen2 folder: a text-only LM
  mmfm convert model.gguf llm/ --from gguf --dtype bfloat16 a GGUF file, dequantized to bfloat16
  mmfm convert model.gguf vlm/ --from gguf --base mmfm-tiny the LM as backbone, mmfm-tiny's encoders around it

SRC is read in its own library's format (safetensors memory-mapped; .pt/.bin/.pth only with
torch.load(weights_only=True), so nothing is unpickled) and remapped to mmfm keys. The components the
source does not bring come from --base with fresh weights, and are listed; without --base, the converter
suggests one (a language model becomes a text-only model; one tower gets mmfm-base's backbone and heads).
OUT/ gets config.yaml + model.safetensors: load it with mmfm.load("OUT/"). `mmfm export` goes the other way.
"""

_GENERATE_TEXT_EPILOG = """\
examples:
  mmfm generate-text --model llm/ "The capital of France is"            streamed as it is decoded
  mmfm generate-text --model llm/ "Once upon a time" "Dear Sir," --max-new-tokens 40 --json
  mmfm generate-text --model llm/ --as-chat "What is the capital of France?" --system "Be brief."
  mmfm generate-text --model llm/ "Q: 2+2? A:" --stop $'\\n' --do-sample --temperature 0.7 --seed 0
  mmfm generate-text --model llm/ --chat --system "You are a helpful assistant."

Each PROMPT is continued by the model's language model (its caption head); several are generated in
batches of --batch-size and printed one line each (line breaks as \\n), in order. One PROMPT is streamed to
stdout as it is decoded, unless --no-stream, --json or --num-beams > 1. With --json each PROMPT prints
{"prompt": PROMPT, "text": TEXT} on its own line. --as-chat sends each PROMPT as a user message (after the
--system message) through the model's chat template, with the assistant's turn opened; the model needs a
chat template (a Hugging Face or GGUF language model brings one).

--chat starts a conversation: each line read from stdin is a user turn, answered in the context of the
whole conversation and streamed to stdout. /reset starts a new conversation, /help lists the commands,
Ctrl-D (or /exit) ends the session; Ctrl-C stops a reply, and twice at the prompt ends the session. The
"> " prompt goes to stderr, and only when stdin is a terminal: piped input works and stdout holds the replies.
"""

_CHAT_EPILOG = """\
examples:
  mmfm chat --model vlm/ --image cat.jpg                    the first message goes with the image
  mmfm chat --model vlm/ --image 3.png --audio eight.wav --system "Answer in one word."
  mmfm chat --model vlm/ --no-stream --max-new-tokens 64 --device cuda --dtype bfloat16
  printf '/image 3.png\\nWhich digit is this?\\n' | mmfm chat --model vlm/

Each line read from stdin is a user turn, answered by the model (model.chat) in the context of the whole
conversation and streamed to stdout. --image and --audio files go with the first message; at the prompt,
`/image PATH` and `/audio PATH` attach a file to the next message (repeat for more). An attached file is an
<image> or <audio> placeholder at the start of its message, in the order attached, and stays in the
conversation; a file that cannot be read is reported and nothing is attached. /reset starts a new conversation
(without its files; --system stays), /help lists the commands, Ctrl-D (or /exit) ends the session; Ctrl-C
stops a reply, and twice at the prompt ends the session. The model needs a chat template, and an encoder for
each modality it is shown. The "> " prompt and notes go to stderr, and only when stdin is a terminal.
"""

_EXPORT_EPILOG = """\
examples:
  mmfm export llm/ hf/ --to hf_llama                   an mmfm checkpoint folder -> a Hugging Face folder
  mmfm export model.gguf hf/ --to hf_llama             a GGUF file, through mmfm, to transformers
  mmfm export llm/ hf/ --to hf_llama --overwrite       write into a folder that holds files already

SRC is anything --model takes (a checkpoint folder, a GGUF file, a Hugging Face folder, a tag). --to
hf_llama writes the language model (token embedding, backbone, LM head) with its tokenizer, special
tokens and chat template as config.json, model.safetensors, tokenizer.json,
tokenizer_config.json and generation_config.json: transformers' AutoModelForCausalLM.from_pretrained(OUT)
loads it (LlamaForCausalLM, or Qwen2ForCausalLM for q/k/v biases) and llama.cpp's converters read it. The
model needs an "hf" tokenizer (a tokenizer.json); media encoders and other heads are left out. OUT must be
new or empty unless --overwrite, and can never be SRC or hold it.
"""


def main(argv: list[str] | None = None) -> int:
    """Runs the `mmfm` command line.

    Args:
        argv: the arguments after the program name; None reads `sys.argv[1:]`.

    Returns:
        The exit code: 0 on success, 2 for a usage error or an error mmfm raises on purpose, or the command's own
        (130 when a `generate-text` stream or chat session is ended with Ctrl-C).
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would blame the top parser: name the subcommand and show its usage instead
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        _check_text_options(args)
        code = args.run(args)
    except MMFMError as e:
        _print_error(str(e))
        return getattr(e, "exit_code", 2)
    except OSError as e:  # a file the user named could not be read or written: say which and why, in one line
        _print_error(_os_error(e))
        return 2
    return code or 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `mmfm` and all its subcommands (built without importing torch or the model code)."""
    parser = argparse.ArgumentParser(
        prog="mmfm",
        description="Multimodal foundation models: caption, classify and embed images and audio; generate images "
        "and text; chat.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mmfm {mmfm.__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    def command(
        name: str, summary: str | None, epilog: str, run: Callable[[argparse.Namespace], None], **kwargs: Any
    ) -> argparse.ArgumentParser:
        # Without help= a command is left out of `mmfm --help` (deprecated names).
        listed = {"help": summary} if summary is not None else {}
        sub = commands.add_parser(
            name,
            **listed,
            description=kwargs.pop("description", summary),
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(run=run, parser=sub)
        return sub

    info = command("info", "Show a model's config and parameter counts, or list the models.", _INFO_EPILOG, _info)
    info.add_argument("--model", metavar="MODEL", help="a preset or config name, checkpoint folder, tag or YAML file")
    info.add_argument("spec", nargs="?", metavar="MODEL", help=argparse.SUPPRESS)  # the old positional form
    info.add_argument("--list", action="store_true", help="list presets, shipped config names and pretrained tags")

    caption = command("caption", "Write a caption for each image or audio file.", _CAPTION_EPILOG, _caption)
    _add_inference_options(caption)
    caption.add_argument("--prompt", help="text every caption starts from (not printed)")
    _add_decoding_options(caption, "caption")

    summary = "Classify each image or audio file, with the trained head or zero-shot against labels."
    classify = command("classify", summary, _CLASSIFY_EPILOG, _classify)
    _add_inference_options(classify)
    labels = classify.add_mutually_exclusive_group()
    labels.add_argument("--labels", metavar="A,B,C", help="comma-separated labels for zero-shot classification")
    labels.add_argument("--labels-file", metavar="FILE", help="zero-shot labels, one per line (blank lines skipped)")
    classify.add_argument("--top", type=_positive_int, default=5, metavar="N", help="classes shown (default: 5)")
    # --top-k was this option's name; caption's --top-k means sampling, so classify's now has its own name.
    classify.add_argument(
        "--top-k", type=_positive_int, dest="top", action=_Deprecated, use="--top", help=argparse.SUPPRESS
    )

    embed = command("embed", "Embed texts, images or audio files as unit vectors.", _EMBED_EPILOG, _embed)
    _add_inference_options(embed, files="*")
    embed.add_argument("--text", action="append", metavar="TEXT", help="a text to embed; repeat for more")
    embed.add_argument("--out", metavar="FILE.npy", help="write an (N, E) float32 .npy array instead of JSON lines")

    summary = "Generate images from texts, audio files or images (variations)."
    generate = command("generate-image", summary, _GENERATE_EPILOG, _generate)
    _add_generate_options(generate)
    old = command("generate", None, _GENERATE_EPILOG, _generate, description=f"Deprecated: {summary}")
    _add_generate_options(old)

    summary = "Continue text prompts, or chat, with a model's language model."
    text = command("generate-text", summary, _GENERATE_TEXT_EPILOG, _generate_text)
    text.add_argument("prompts", nargs="*", metavar="PROMPT", help="texts to continue; several: generated in batches")
    _add_model_options(text)
    _add_batch_options(text, "prompts")
    text.add_argument("--chat", action="store_true", help="a conversation: one user turn per line of stdin")
    text.add_argument(
        "--as-chat", action="store_true", help="send each PROMPT as a user message through the chat template"
    )
    _add_text_generation_options(
        text,
        system="a system message before the user's (--as-chat, --chat)",
        stream="print the text as it is decoded (default: one PROMPT or --chat, without --json)",
    )

    summary = "Chat with a model about images and sounds, one user turn per line of stdin."
    chat = command("chat", summary, _CHAT_EPILOG, _chat)
    _add_model_options(chat)
    for modality in MEDIA:
        chat.add_argument(
            f"--{modality}",
            action="append",
            metavar="FILE",
            help=f"an {modality} file for the first message; repeatable",
        )
    _add_text_generation_options(
        chat,
        system="a system message before the user's (kept by /reset)",
        stream="print each reply as it is decoded (default: unless --num-beams is above 1)",
    )

    summary = "Serve a model: a web app and an OpenAI-compatible API on one port."
    serve = command("serve", summary, _SERVE_EPILOG, _serve)
    _add_model_options(serve)
    serve.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1, this machine)"
    )
    serve.add_argument("--port", type=_port, default=7860, metavar="N", help="default: 7860; 0 picks a free one")
    serve.add_argument(
        "--max-batch-size",
        type=_positive_int,
        default=DEFAULT_SERVE_BATCH_SIZE,
        metavar="N",
        help=f"chat requests decoded together (default: {DEFAULT_SERVE_BATCH_SIZE})",
    )
    serve.add_argument(
        "--batch-wait-ms",
        type=_milliseconds,
        default=DEFAULT_BATCH_WAIT_MS,
        metavar="MS",
        help="how long a batch waits for more chat requests to join it before it starts "
        f"(default: {DEFAULT_BATCH_WAIT_MS:g})",
    )
    serve.add_argument("--api-key", metavar="KEY", help="require this key on every request (default: $MMFM_API_KEY)")
    serve.add_argument(
        "--allowed-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder requests may read files from; repeatable",
    )

    summary = "Train or fine-tune a model from a YAML recipe (also one rank of a torchrun job)."
    train = command("train", summary, _TRAIN_EPILOG, _train)
    train.add_argument("config", metavar="CONFIG", help="a training recipe (YAML), e.g. configs/train/demo.yaml")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe fields to change (optim.lr=3e-4)")

    summary = "Compute a model's standard metrics on a manifest or a class folder, or compare evaluations."
    evaluate = command("eval", summary, _eval_epilog(), _eval)
    evaluate.add_argument("--model", metavar="MODEL", help=_MODEL_HELP)
    evaluate.add_argument(
        "--data", metavar="MANIFEST|DIR", help="a JSONL manifest of held-out examples, or a class folder DIR/<class>/"
    )
    labels = evaluate.add_mutually_exclusive_group()
    labels.add_argument("--labels", metavar="A,B,C", help="a class folder's classes (folder names; default: all)")
    labels.add_argument("--labels-file", metavar="FILE", help="the same, one per line (blank lines skipped)")
    evaluate.add_argument("--metrics", metavar="LIST", help="comma-separated metric names to compute (default: all)")
    evaluate.add_argument(
        "--config",
        "--recipe",
        metavar="RECIPE",
        help="take the tasks from this recipe (default: the run's own)",
    )
    evaluate.add_argument(
        "--samples", type=_natural, default=0, metavar="N", help="also print N sample outputs per task"
    )
    evaluate.add_argument("--batch-size", type=_positive_int, default=64, metavar="N", help="default: 64")
    evaluate.add_argument("--seed", type=int, default=0, metavar="S", help="seeds every random draw (default: 0)")
    evaluate.add_argument(
        "--judge",
        choices=("auto", "digits", "none"),
        default="auto",
        help="what reads generated images (default: auto, the digits judge when every label is a digit)",
    )
    evaluate.add_argument(
        "--images-per-class",
        type=_natural,
        default=10,
        metavar="N",
        help="images generated per label for each image_gen task (default: 10; 0: none)",
    )
    evaluate.add_argument(
        "--out",
        metavar="DIR|FILE.json",
        help="write eval.json, eval.md and figures into DIR, or the JSON alone to FILE.json (created if missing)",
    )
    evaluate.add_argument(
        "--compare", nargs="+", metavar="RUN", help="compare eval.json files (or folders holding one) side by side"
    )

    summary = "Convert weights of another library (timm, open_clip, Hugging Face, AST, ...) into an mmfm checkpoint."
    conv = command("convert", summary, _CONVERT_EPILOG, _convert)
    conv.add_argument("src", metavar="SRC", help="the source checkpoint: a file or directory in its library's format")
    conv.add_argument("out", metavar="OUT", help="the directory to write config.yaml + model.safetensors into")
    conv.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="SOURCE",
        help="the source's format: timm, open_clip, ast, hf_bert, diffusers, hf_llama (a Hugging Face llama, "
        "mistral or qwen2 folder), gguf (a .gguf file)",
    )
    conv.add_argument("--model-name", metavar="NAME", help="the source's architecture name, where SRC does not say")
    conv.add_argument(
        "--base",
        metavar="PRESET",
        help="preset for the parts SRC lacks (default: the converter's suggestion: text-only for a language model, "
        "else mmfm-base)",
    )
    conv.add_argument(
        "--dtype", metavar="DTYPE", help=f"the weights' dtype: {', '.join(DTYPE_NAMES)} (default: {DTYPE_NAMES[0]})"
    )
    conv.add_argument(
        "--overwrite",
        action="store_true",
        help="write into OUT even when it holds other files and is not an mmfm checkpoint",
    )

    summary = "Export an mmfm model to another library's format (a Hugging Face Llama folder)."
    export = command("export", summary, _EXPORT_EPILOG, _export)
    export.add_argument("model", metavar="SRC", help="the model: a checkpoint folder, GGUF file, tag, ... (as --model)")
    export.add_argument("out", metavar="OUT", help="the folder to write (created if missing)")
    export.add_argument("--to", required=True, metavar="FORMAT", help=f"the format: {', '.join(EXPORTERS)}")
    export.add_argument("--overwrite", action="store_true", help="write into OUT even when it holds files")

    summary = "Write a built-in dataset as files and JSONL manifests."
    data = command("data", summary, _DATA_EPILOG, _no_dataset)
    datasets = data.add_subparsers(dest="dataset", title="datasets", metavar="DATASET", required=True)
    writers = (
        (
            "digits",
            "Write the handwritten digits demo dataset: images, DTMF tones, captions, labels.",
            _DIGITS_EPILOG,
            _data_digits,
            "seed of the tones and the split",
        ),
        (
            "digits-chat",
            "Write the chat demo's data: conversations about digit images, spoken digits and tones.",
            _DIGITS_CHAT_EPILOG,
            _data_digits_chat,
            "seed of the split, clips, tones and conversations",
        ),
    )
    for name, summary, epilog, run, seeds in writers:
        writer = datasets.add_parser(
            name, help=summary, description=summary, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        writer.set_defaults(run=run, parser=writer)
        writer.add_argument("out", metavar="OUT", help="the directory to write into (created if missing)")
        writer.add_argument("--seed", type=int, default=0, metavar="N", help=f"{seeds} (default: 0)")
    return parser


def _add_inference_options(parser: argparse.ArgumentParser, files: str = "+") -> None:
    """--model, --device, --dtype, --batch-size, --json and the FILE arguments of caption, classify and embed."""
    parser.add_argument("files", nargs=files, metavar="FILE", help=_FILES_HELP)
    _add_model_options(parser)
    _add_batch_options(parser, "inputs")


def _add_batch_options(parser: argparse.ArgumentParser, inputs: str) -> None:
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"{inputs} per forward pass (default: {DEFAULT_BATCH_SIZE}); memory grows with it, not with the {inputs}",
    )
    parser.add_argument("--json", action="store_true", help=_JSON_HELP)


def _add_decoding_options(parser: argparse.ArgumentParser, what: str) -> None:
    """How tokens are chosen (`GenerationConfig`), for caption and generate-text; checked before the model loads."""
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help=f"{what} length limit in tokens")
    parser.add_argument("--num-beams", type=int, metavar="N", help="beam search width (default: 1, greedy)")
    parser.add_argument("--do-sample", action="store_true", help="sample tokens instead of taking the most likely")
    parser.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (default: 1.0)")
    parser.add_argument("--top-k", type=int, metavar="K", help="sample among the k likeliest tokens (default: 0, all)")
    parser.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass (default: 1.0, all)")
    parser.add_argument("--seed", type=int, metavar="N", help=f"seed for --do-sample, for a reproducible {what}")


def _add_text_generation_options(parser: argparse.ArgumentParser, system: str, stream: str) -> None:
    """--system, --stream / --no-stream and the decoding options of generate-text and chat, with their help texts."""
    parser.add_argument("--system", metavar="TEXT", help=system)
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, help=stream)
    _add_decoding_options(parser, "text")
    parser.add_argument(
        "--repetition-penalty", type=float, metavar="R", help="penalise tokens already seen (default: 1.0, none)"
    )
    parser.add_argument("--stop", action="append", metavar="TEXT", help="end the text where TEXT appears; repeatable")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument("--device", default="cpu", metavar="DEVICE", help=_DEVICE_HELP)
    parser.add_argument("--dtype", metavar="DTYPE", help=_DTYPE_HELP)


def _add_generate_options(parser: argparse.ArgumentParser) -> None:
    _add_model_options(parser)
    conditions = parser.add_mutually_exclusive_group(required=True)
    conditions.add_argument("--text", action="append", metavar="TEXT", help="a prompt; repeat for more")
    conditions.add_argument("--audio", action="append", metavar="FILE", help="an audio file or folder; repeatable")
    conditions.add_argument("--image", action="append", metavar="FILE", help="an image (folder) to vary; repeatable")
    parser.add_argument("--out", required=True, metavar="PATH", help="the image (or grid) to write: .png, .jpg, ...")
    parser.add_argument("--num-images", type=_positive_int, default=1, metavar="N", help="per condition (default: 1)")
    parser.add_argument(
        "--num-inference-steps", type=int, metavar="N", help="denoising steps (default: the model's image_gen config)"
    )
    parser.add_argument("--guidance-scale", type=float, metavar="G", help="classifier-free guidance scale, 1 for none")
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), help="the sampler (default: the model's)")
    parser.add_argument("--seed", type=int, metavar="N", help="seed for reproducible images")
    parser.add_argument(
        "--batch-size", type=_positive_int, metavar="N", help="most images denoised at once (default: all of them)"
    )
    parser.add_argument("--json", action="store_true", help=_JSON_HELP)
    # The names before they matched the Python API's.
    parser.add_argument(
        "--steps",
        type=int,
        dest="num_inference_steps",
        action=_Deprecated,
        use="--num-inference-steps",
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--guidance",
        type=float,
        dest="guidance_scale",
        action=_Deprecated,
        use="--guidance-scale",
        help=argparse.SUPPRESS,
    )


class _Deprecated(argparse.Action):
    """An old option name: stores its value under the new option's dest and says on stderr to use `use` instead."""

    def __init__(self, *args: Any, use: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.use = use

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        print(f"mmfm: warning: {option} is deprecated; use {self.use}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_natural, _positive_int = _whole_number(0), _whole_number(1)


def _milliseconds(text: str) -> float:
    """An argparse type: a finite number of milliseconds, at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _port(text: str) -> int:
    port = _natural(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {port}")
    return port


# ---- commands (each imports what it needs, so that parsing stays fast) ----


def _info(args: argparse.Namespace) -> None:
    spec = args.model or args.spec
    if args.list or spec is None:
        _list_models()
        return
    model = _shapes_only(spec)
    import yaml

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


def _list_models() -> None:
    from mmfm import registry
    from mmfm.pretrained import list_pretrained

    # list_configs (shipped configs/models/NAME.yaml) arrives with issue 10's reachable configs.
    configs = registry.list_configs() if hasattr(registry, "list_configs") else []
    sections = {
        "presets: architectures, random weights (mmfm.create_model)": registry.list_models(),
        "configs: shipped architectures, configs/models/NAME.yaml (mmfm.create_model)": configs,
        "pretrained: tags with weights (mmfm.load)": list_pretrained(),
    }
    print("\n\n".join("\n".join([f"# {title}", *names]) for title, names in sections.items()))


def _shapes_only(spec: str) -> MultimodalModel:
    """The model `spec` names, for counting: architectures and checkpoint folders on the meta device (nothing is
    allocated or initialised, so large models are instant); anything else (a tag, a hub repository, a weights
    file, a Hugging Face folder) is loaded."""
    import torch

    from mmfm.checkpoint import CONFIG_NAME
    from mmfm.errors import ConfigError
    from mmfm.loader import create_model, open_model
    from mmfm.model import MultimodalModel
    from mmfm.registry import read_config

    with torch.device("meta"):
        if (Path(spec) / CONFIG_NAME).is_file():
            return MultimodalModel(read_config(Path(spec) / CONFIG_NAME))
        try:
            return create_model(spec)
        except ConfigError:
            pass  # not a preset, config name or YAML file: open_model says what it is, or why not
    return open_model(spec)[0]


def _caption(args: argparse.Namespace) -> None:
    inputs = expand_inputs(args.files)
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
    from mmfm.text_generation import GenerationConfig, check_seed

    check_seed("--seed", args.seed)
    GenerationConfig.from_options({k: v for k, v in options.items() if k != "prompt"})  # before the model loads
    model = _open_model(args)
    from mmfm.pipelines import caption

    captions = _run_grouped(inputs, lambda batch: caption(model, **batch, **options, **_batching(args)))
    for (path, _), text in zip(inputs, captions):
        if args.json:
            _print_json({"input": printable(path), "caption": text})
        else:
            print(f"{printable(path)}\t{text.translate(_LINE_ESCAPES)}")


def _classify(args: argparse.Namespace) -> None:
    inputs = expand_inputs(args.files)
    labels = _read_labels(args.labels, args.labels_file)
    model = _open_model(args)
    from mmfm.pipelines import classify

    tops = _run_grouped(inputs, lambda batch: classify(model, **batch, labels=labels, **_batching(args)).top(args.top))
    for (path, _), top in zip(inputs, tops):
        if args.json:
            record = {"input": printable(path), "label": top[0][0]}
            _print_json({**record, "top": [{"label": c, "probability": p} for c, p in top]})
        else:
            print("\t".join([printable(path), *(f"{label} ({prob:.4f})" for label, prob in top)]))


def _embed(args: argparse.Namespace) -> None:
    if bool(args.text) == bool(args.files):
        raise InputError("embed takes either --text (one or more) or FILE arguments, not both and not neither")
    inputs = [(text, "text") for text in args.text] if args.text else expand_inputs(args.files)
    if args.out is not None:
        _check_out(args.out, "embeddings")
    model = _open_model(args)
    import torch

    from mmfm.pipelines import embed

    rows = _run_grouped(inputs, lambda batch: list(embed(model, **batch, **_batching(args))))
    embeddings = torch.stack(rows).float().numpy()  # (N, E)
    if args.out is None:
        for (item, _), row in zip(inputs, embeddings.tolist()):
            _print_json({"input": printable(item), "embedding": row})
        return
    import numpy as np

    try:
        with open(args.out, "wb") as f:
            np.save(f, embeddings)
    except OSError as e:
        raise InputError(f"--out {quoted(args.out)}: cannot write the embeddings ({e.strerror})") from None
    if args.json:
        for i, (item, _) in enumerate(inputs):
            _print_json({"input": printable(item), "out": printable(args.out), "row": i})
    shape = f"{embeddings.shape[0]}x{embeddings.shape[1]}"
    print(f"mmfm: wrote {shape} float32 embeddings to {printable(args.out)}", file=sys.stderr)


def _generate(args: argparse.Namespace) -> None:
    if args.command == "generate":
        print("mmfm: warning: `mmfm generate` is deprecated; use `mmfm generate-image`", file=sys.stderr)
    from PIL import Image

    out = Path(args.out)
    if out.suffix.lower() not in Image.registered_extensions():
        raise InputError(f"--out {quoted(args.out)}: unknown image extension '{quoted(out.suffix)}' (try .png)")
    _check_out(args.out, "image")
    from mmfm.text_generation import check_seed

    check_seed("--seed", args.seed)
    if args.text:
        conditions = {"text": args.text}
    else:
        modality = "audio" if args.audio else "image"
        paths = [path for path, _ in expand_inputs(args.audio or args.image, modalities=(modality,))]
        conditions = {MEDIA[modality].argument: paths}
    model = _open_model(args)
    from mmfm.pipelines import generate_image, image_grid

    images = generate_image(
        model,
        **conditions,
        num_images=args.num_images,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        scheduler=args.scheduler,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=sys.stderr.isatty(),
    )
    items = next(iter(conditions.values()))
    columns = args.num_images if len(items) > 1 else math.ceil(math.sqrt(len(images)))
    picture = images[0] if len(images) == 1 else image_grid(images, columns)
    try:
        picture.save(out)
    except (OSError, ValueError) as e:
        raise InputError(f"--out {quoted(args.out)}: cannot write the image ({e})") from None
    if args.json:
        for i, item in enumerate(items):
            cells = [divmod(i * args.num_images + j, columns) for j in range(args.num_images)]
            record = {"input": printable(item), "out": printable(args.out), "cells": cells}
            _print_json({**record, "cell_size": list(images[0].size)})
    what = "1 image" if len(images) == 1 else f"a grid of {len(images)} images"
    print(f"mmfm: wrote {what} to {printable(args.out)}", file=sys.stderr)


def _generate_text(args: argparse.Namespace) -> int | None:
    prompts = args.prompts
    if args.chat:
        if prompts:
            raise InputError("--chat reads the conversation from stdin, one user turn per line; give no PROMPT")
        if args.json:
            raise InputError("--chat prints each reply as text; --json is for PROMPT arguments")
    elif not prompts:
        raise InputError("generate-text needs a PROMPT (or several), or --chat for a conversation")
    if args.system is not None and not (args.chat or args.as_chat):
        raise InputError("--system is a chat message: add --as-chat (each PROMPT as a user turn) or --chat")
    generation, stream = _text_generation(args, len(prompts), args.json)
    model = _open_model(args)
    chat = "--chat" if args.chat else "--as-chat" if args.as_chat else None
    if chat is not None and model.config.text.chat_template is None:
        raise InputError(
            f"{chat}: the model {quoted(args.model)} has no chat template (text.chat_template) to render a "
            "conversation with; give PROMPT texts without --as-chat, or use a model that has one"
        )
    if args.chat:
        from mmfm.cli_chat import run_chat

        return run_chat(model, system=args.system, stream=stream, generation=generation)
    opening = [{"role": "system", "content": args.system}] if args.system is not None else []
    conversations = [[*opening, {"role": "user", "content": p}] for p in prompts]
    items = {"messages": conversations} if chat else {"prompts": prompts}
    if stream:
        return _print_stream(model.generate_text(**{k: v[0] for k, v in items.items()}, stream=True, **generation))
    texts = model.generate_text(**items, **generation, **_batching(args))
    for prompt, text in zip(prompts, texts):
        if args.json:
            _print_json({"prompt": prompt, "text": text})
        else:
            print(text if len(prompts) == 1 else text.translate(_LINE_ESCAPES))
    return None


def _chat(args: argparse.Namespace) -> int:
    generation, stream = _text_generation(args)
    model = _open_model(args)
    if model.config.text.chat_template is None:
        raise InputError(
            f"chat: the model {quoted(args.model)} has no chat template (text.chat_template) to render a "
            "conversation with; use a model that has one (a Hugging Face or GGUF language model brings one)"
        )
    from mmfm.cli_chat import run_chat

    media = {modality: getattr(args, modality) or [] for modality in MEDIA}
    return run_chat(model, system=args.system, stream=stream, generation=generation, media=media)


def _text_generation(args: argparse.Namespace, prompts: int = 1, as_json: bool = False) -> tuple[dict[str, Any], bool]:
    """The `GenerationConfig` options of generate-text or chat, and whether text is streamed; checked before loading.

    Args:
        args: the parsed options.
        prompts: how many PROMPT texts are generated (a chat generates one reply at a time).
        as_json: --json was given.
    """
    generation = {
        "max_new_tokens": args.max_new_tokens,
        "num_beams": args.num_beams,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "stop": args.stop,
        "seed": args.seed,
    }
    generation = {"do_sample": args.do_sample, **{k: v for k, v in generation.items() if v is not None}}
    from mmfm.text_generation import GenerationConfig, check_seed

    check_seed("--seed", args.seed)
    beams = GenerationConfig.from_options(generation).num_beams  # every option checked before the model loads
    return generation, _streaming(args.stream, beams, prompts, as_json)


def _print_stream(pieces: Any) -> int | None:
    """Prints text pieces as they come, then a line break; Ctrl-C stops them (exit code 130)."""
    wrote = False
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
            wrote = True
    except KeyboardInterrupt:
        print(flush=True)
        return 130
    except BaseException:
        if wrote:
            print(flush=True)
        raise
    print(flush=True)
    return None


def _streaming(stream: bool | None, beams: int, prompts: int, as_json: bool) -> bool:
    """Whether text is printed as it is decoded: --stream / --no-stream, else when it can."""
    several = prompts > 1
    if stream is None:
        return not (several or as_json or beams > 1)
    if stream:
        if as_json:
            raise InputError("--stream prints text as it comes and --json whole records; choose one")
        if several:
            raise InputError(
                f"--stream prints one PROMPT's text as it is decoded, got {prompts} PROMPTs (without "
                "--stream they are generated in batches)"
            )
        if beams > 1:
            raise InputError("--stream decodes token by token; beam search (--num-beams above 1) cannot stream")
    return stream


def _export(args: argparse.Namespace) -> None:
    import importlib

    from mmfm.loader import check_export_output

    if args.to not in EXPORTERS:
        raise InputError(f"--to {quoted(args.to)}: unknown format (known: {', '.join(EXPORTERS)})")
    check_export_output(args.model, args.out, args.overwrite)
    module, function = EXPORTERS[args.to]
    exporter = getattr(importlib.import_module(module), function)
    model = _open_model(args, device=None, dtype=None)
    exporter(model, args.out)
    print(f"mmfm: wrote {printable(args.out)} ({args.to}, from {printable(args.model)})", file=sys.stderr)


def _no_dataset(args: argparse.Namespace) -> None:  # unreachable: argparse requires DATASET
    raise InputError("mmfm data needs a DATASET")


def _write_dataset(args: argparse.Namespace, writer: Callable[..., Path]) -> Path:
    """`writer(args.out, seed=args.seed)`, with the seed checked and a write failure as an InputError."""
    if not 0 <= args.seed < 2**64:
        raise InputError(f"--seed must be a whole number in [0, 2**64 - 1], got {quoted(str(args.seed))}")
    try:
        return writer(args.out, seed=args.seed)
    except OSError as e:
        raise InputError(f"{args.out}: cannot write the dataset ({e.strerror or e})") from None


def _data_digits(args: argparse.Namespace) -> None:
    from mmfm.data.digits import write_digits

    out = _write_dataset(args, write_digits)
    print(f"wrote the digits dataset to {out}")
    for split in ("train", "val"):
        manifest = out / f"{split}.jsonl"
        count = sum(1 for line in manifest.read_text().splitlines() if line.strip())
        print(f"{split:<5}  {count:>4} examples  {manifest}")


def _data_digits_chat(args: argparse.Namespace) -> None:
    from mmfm.data import digits_chat

    out = _write_dataset(args, digits_chat.write_digits_chat)
    print(f"wrote the digits chat dataset to {out}")
    families = {}
    for split in ("train", "val"):
        records = [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
        families[split] = collections.Counter(record["family"] for record in records)
        print(f"{split:<5}  {len(records):>4} conversations  {out / f'{split}.jsonl'}")
    for family in digits_chat.FAMILIES:
        print(f"  {family:<18} {families['train'][family]:>4} train  {families['val'][family]:>3} val")
    stage1 = out / "stage1.jsonl"
    print(f"stage1 {len(stage1.read_text().splitlines()):>4} caption-style conversations  {stage1}")
    for split in ("train", "val"):
        manifest = out / f"towers_{split}.jsonl"
        records = [json.loads(line) for line in manifest.read_text().splitlines()]
        kinds = collections.Counter("image" if "image" in r else r["audio"].partition("/")[0] for r in records)
        counts = f"{kinds['image']} images, {kinds['speech']} speech clips, {kinds['tones']} tones"
        print(f"towers {split:<5}  {len(records):>4} examples ({counts})  {manifest}")


def _convert(args: argparse.Namespace) -> None:
    import inspect

    from mmfm.convert import convert, get_converter, list_sources
    from mmfm.loader import check_convert_output, from_converted, parse_dtype

    if args.source not in list_sources():
        raise InputError(f"--from {quoted(args.source)}: unknown source (known: {', '.join(list_sources())})")
    dtype = parse_dtype(args.dtype)
    # an OUT that is SRC or lies inside it, or a non-mmfm folder without --overwrite, is refused before any reading
    check_convert_output(args.src, args.out, overwrite=args.overwrite)
    kwargs: dict[str, Any] = {}
    parameters = inspect.signature(get_converter(args.source)).parameters
    if args.model_name is not None:
        if "model_name" not in parameters:
            raise InputError(f"--model-name: the '{args.source}' converter reads the architecture from SRC itself")
        kwargs["model_name"] = args.model_name
    if dtype is not None and "dtype" in parameters:  # a converter that dequantizes does so straight to the dtype
        kwargs["dtype"] = dtype
    converted = convert(args.source, args.src, **kwargs)
    model, fresh = from_converted(converted, args.base, f"{args.src} ({args.source})", dtype=dtype)
    model.save_pretrained(args.out)
    print(f"mmfm: wrote {args.out} ({args.source} weights from {args.src})", file=sys.stderr)
    if fresh:
        print(f"mmfm: freshly initialised from {model.config.name}: {', '.join(fresh)}", file=sys.stderr)


def _serve(args: argparse.Namespace) -> None:
    from mmfm.serve.server import serve

    for folder in args.allowed_dir:  # before the model loads
        if not os.path.isdir(folder):
            raise InputError(f"--allowed-dir {folder}: not a folder")
    api_key = args.api_key or os.environ.get("MMFM_API_KEY")
    model = _open_model(args)
    serve(
        model,
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        api_key=api_key,
        allowed_dirs=args.allowed_dir,
        batch_wait_ms=args.batch_wait_ms,
    )


def _train(args: argparse.Namespace) -> None:
    from mmfm.train import TrainConfig, parse_overrides, train

    final = train(TrainConfig.from_file(args.config, parse_overrides(args.overrides)))
    if final is not None:
        print(f"model: {final}")


def _eval_epilog() -> str:
    from mmfm.eval.report import METRICS

    return _EVAL_EPILOG.format(metrics="\n".join(f"  {name:16}{meaning}" for name, meaning in METRICS.items()))


def _eval(args: argparse.Namespace) -> None:
    from mmfm.eval.report import compare_runs, metrics_table, prepare_output, write_report
    from mmfm.eval.run import evaluate_data

    if args.compare:
        given = [
            f"--{o.replace('_', '-')}"
            for o in ("model", "data", "labels", "labels_file", "metrics")
            if getattr(args, o)
        ]
        if given:
            raise InputError(f"--compare reads finished evaluations; it takes no {', '.join(given)}")
        print(compare_runs(args.compare, args.out), end="")
        return
    missing = [f"--{o}" for o in ("model", "data") if getattr(args, o) is None]
    if missing:
        raise InputError(f"mmfm eval needs {' and '.join(missing)} (or --compare RUN RUN ... to compare evaluations)")
    if args.out:  # checked before the model loads: a bad path fails at once
        prepare_output(args.out, "--out", folder=not args.out.endswith(".json"))
    model = _open_model(args, device=None, dtype=None)
    run = evaluate_data(
        model,
        args.data,
        model_name=args.model,
        recipe=args.config,
        labels=_read_labels(args.labels, args.labels_file),
        metrics=args.metrics,
        batch_size=args.batch_size,
        seed=args.seed,
        samples=args.samples,
        judge=args.judge,
        images_per_class=args.images_per_class,
        progress=sys.stderr.isatty(),
    )
    print(metrics_table(run.metrics), end="")
    if run.samples:
        print("\nsamples:")
    for line in run.samples:
        print(line.translate(_LINE_ESCAPES))
    if args.out:
        written = write_report(run, args.out)
        print(f"mmfm: wrote {', '.join(str(p) for p in written)}", file=sys.stderr)


# ---- helpers ----


_UNSET = object()


def _open_model(args: argparse.Namespace, device: Any = _UNSET, dtype: Any = _UNSET) -> MultimodalModel:
    """The model `--model` names on `--device` in `--dtype` (`mmfm.loader.open_model`); random weights warn."""
    from mmfm.loader import open_model, parse_dtype

    device = args.device if device is _UNSET else device
    dtype = parse_dtype(args.dtype if dtype is _UNSET else dtype)  # a bad name fails before the model is built
    if device is not None:
        _check_device(device)
    model, random = open_model(args.model, device=device, dtype=dtype)
    if random:
        print(
            f"mmfm: warning: '{args.model}' builds a model with random weights, so its outputs mean nothing; "
            "pass a checkpoint folder, a pretrained tag or hf-hub:org/name for a trained model",
            file=sys.stderr,
        )
    return model


def _check_device(name: str) -> None:
    """Refuses a --device torch cannot parse or this machine does not have, as one line, before anything loads."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InputError(f"--device {name}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {name}: CUDA is not available (torch.cuda.is_available() is False: no GPU, or a "
                "CPU-only torch; see the README's 'GPU and dtypes')"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name}: MPS is not available on this machine")


def _batching(args: argparse.Namespace) -> dict[str, Any]:
    """The pipelines' batch_size= and progress= (a bar on stderr, only when it is a terminal)."""
    return {"batch_size": args.batch_size, "progress": sys.stderr.isatty()}


def _run_grouped(inputs: Sequence[tuple[str, str]], run: Callable[[dict[str, list[str]]], Sequence[Any]]) -> list[Any]:
    """Calls `run` once per modality (`run({"images": [...]})`, `run({"text": [...]})`); results in input order."""
    groups: dict[str, list[int]] = {}
    for i, (_, modality) in enumerate(inputs):
        groups.setdefault(modality, []).append(i)
    results: list[Any] = [None] * len(inputs)
    for modality, positions in groups.items():
        argument = MEDIA[modality].argument if modality in MEDIA else modality
        for i, result in zip(positions, run({argument: [inputs[i][0] for i in positions]})):
            results[i] = result
    return results


def _print_json(record: dict[str, Any]) -> None:
    print(json.dumps(record, ensure_ascii=False))


def _read_labels(labels: str | None, labels_file: str | None) -> list[str] | None:
    """Zero-shot labels from `--labels a,b,c` or a one-per-line `--labels-file`; None for the trained head.

    Empty and repeated labels are refused (a repeated label would split its probability between the copies), as is
    a labels file that is not a regular UTF-8 text file of at most `MAX_LABELS_FILE_BYTES`.
    """
    if labels is not None:
        found = [(f"label {i}", label.strip()) for i, label in enumerate(labels.split(","), 1)]
        return _distinct_labels("--labels", found)
    if labels_file is None:
        return None
    where = f"--labels-file {quoted(labels_file)}"
    try:
        text = read_small_file(labels_file, "labels file", MAX_LABELS_FILE_BYTES, "mmfm.cli.MAX_LABELS_FILE_BYTES")
    except ConfigError as e:
        raise InputError(f"--labels-file {e}") from None
    nul = text.find("\0")
    if nul >= 0:
        raise InputError(f"{where}: is binary (a NUL byte at character {nul}), not one label per line")
    found = [(f"line {i}", line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not found:
        raise InputError(f"{where}: has no labels (expected one per line)")
    return _distinct_labels(where, found)


def _distinct_labels(where: str, found: list[tuple[str, str]]) -> list[str]:
    """The labels of (position, label) pairs; an empty or repeated one is an InputError naming both positions."""
    from mmfm.pipelines import first_repeat

    empty = next((position for position, label in found if not label), None)
    if empty is not None:
        raise InputError(f"{where}: {empty} is empty; separate labels with single commas")
    labels = [label for _, label in found]
    repeat = first_repeat(labels)
    if repeat is not None:
        first, again = repeat
        raise InputError(
            f"{where}: {found[again][0]} repeats {quoted(labels[again])!r} of {found[first][0]}; each label must "
            "appear once (copies would split its probability)"
        )
    return labels


def _check_text_options(args: argparse.Namespace) -> None:
    """Refuses a text option (--text, --prompt, --labels, KEY=VALUE) whose bytes are not UTF-8, naming it.

    Python hands undecodable argument bytes over as lone surrogates, which no tokenizer or YAML file can hold; file
    names may hold any bytes and are left alone.
    """
    for attribute, option in _TEXT_OPTIONS.items():
        values = getattr(args, attribute, None)
        for value in [values] if isinstance(values, str) else values or []:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                bad = os.fsencode(value[e.start : e.end]) if _escaped(value[e.start : e.end]) else b"?"
                raise InputError(
                    f"{option} {quoted(value)}: is not valid UTF-8 text (the byte {bad!r} at character {e.start}); "
                    "mmfm reads text arguments as UTF-8"
                ) from None


def _escaped(text: str) -> bool:
    return all(0xDC80 <= ord(c) <= 0xDCFF for c in text)


def _check_out(out: str, what: str) -> None:
    """Refuses an --out that cannot be written (a missing folder, a folder itself), before any work is done."""
    path = Path(out)
    folder = path.parent
    where = f"--out {quoted(out)}: cannot write the {what}"
    try:
        is_dir = path.is_dir()
        folder_exists = folder.is_dir()
    except (OSError, ValueError) as e:  # no permission, a name too long, a NUL
        raise InputError(f"{where} ({getattr(e, 'strerror', None) or e})") from None
    if is_dir:
        raise InputError(f"{where} (it is a folder; name a file)")
    if not folder_exists:
        raise InputError(f"{where} (the folder {quoted(str(folder))} does not exist)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{where} (the folder {quoted(str(folder))} is not writable)")


def _os_error(e: OSError) -> str:
    """One line for an OSError about a file: its (shortened) name and the system's reason."""
    reason = e.strerror or errno.errorcode.get(e.errno or 0) or str(e)
    return f"{quoted(str(e.filename))}: {reason}" if e.filename is not None else reason


def _print_error(message: str) -> None:
    """`mmfm: error: ...` as one printable line on stderr, whatever the message holds."""
    line = " ".join(printable(message).splitlines())
    print(f"mmfm: error: {line}", file=sys.stderr)


def _human(count: int) -> str:
    """A parameter count to one decimal of thousands, millions or billions: 86_567_656 -> "86.6M"."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if round(count / scale, 1) >= 1:
            return f"{count / scale:.1f}{unit}"
    return str(count)
