"""Pipelines: raw inputs in, Python values out, around a `MultimodalModel` that only sees tensors.

Each pipeline turns paths, PIL images, arrays and (waveform, rate) pairs into tensors with the model's
processors, feeds the model `batch_size` items at a time (so memory stays flat however many items there are),
and returns captions, class probabilities, embeddings or images. `model.caption(...)` and its siblings are
thin forwards to these functions.
"""

from __future__ import annotations

import math
import os
import reprlib
from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmfm.config import DEFAULT_BATCH_SIZE, MEDIA
from mmfm.decoding import CachedDecoder, RecomputingDecoder
from mmfm.errors import InputError
from mmfm.text_generation import GenerationConfig, check_seed, finite_number, generate, whole_number
from mmfm.zero_shot import zero_shot_weights

# Pipelines take a `mmfm.model.MultimodalModel`; they are annotated `nn.Module` because the model's own
# `caption`, `classify`, ... forward here, and the package keeps its imports free of cycles.
MultimodalModel = nn.Module


@dataclass
class Classification:
    """What `classify` returns.

    Attributes:
        labels: the most likely class of every item.
        probs: (B, num_classes) probabilities; softmax, or independent sigmoids for a multi-label head.
        classes: class names in column order.
    """

    labels: list[str]
    probs: Tensor
    classes: list[str]

    def top(self, k: int = 5) -> list[list[tuple[str, float]]]:
        """The k most likely (class, probability) pairs of every item, best first (all classes if k exceeds them)."""
        k = whole_number("k", k, 1)
        values, index = self.probs.topk(min(k, len(self.classes)), dim=-1)
        return [[(self.classes[i], p) for i, p in zip(ix, vs)] for ix, vs in zip(index.tolist(), values.tolist())]

    def above(self, threshold: float = 0.5) -> list[list[str]]:
        """Every class whose probability reaches `threshold`, per item (the multi-label reading)."""
        threshold = finite_number("threshold", threshold)
        return [[self.classes[i] for i, p in enumerate(row) if p >= threshold] for row in self.probs.tolist()]


@torch.no_grad()
def caption(
    model: MultimodalModel,
    images: Sequence[Any] | None = None,
    audio: Sequence[Any] | None = None,
    prompt: str | Sequence[str] | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    **generation: Any,
) -> list[str]:
    """Generates one text per item, from images, audio, both, or a text prompt alone.

    Args:
        model: the model; it needs a caption head.
        images: paths, PIL images, arrays or tensors.
        audio: paths or (waveform, sample_rate) pairs.
        prompt: text that starts every caption (one string, or one per item); it is not returned.
        batch_size: items generated at once.
        progress: show a progress bar over the batches.
        **generation: `GenerationConfig` fields (max_new_tokens, num_beams, do_sample, temperature, top_k,
            top_p, length_penalty, seed, use_cache).

    Returns:
        The generated text of every item, without the prompt.
    """
    model.head("caption")
    GenerationConfig.from_options(generation, max_new_tokens=model.config.caption.max_new_tokens)  # fail early
    inputs = _media_inputs(model, images=images, audio=audio)
    prompts = _prompts(prompt, _count(inputs) if inputs else None)
    count = len(prompts)
    out: list[str] = []
    for rows in batches(count, batch_size, progress, "caption"):
        media = _process(model, _rows(inputs, rows))
        out += caption_tensors(model, media, prompts[rows], **generation)
    return out


@torch.no_grad()
def caption_tensors(
    model: MultimodalModel, media: dict[str, Tensor], prompt: str | Sequence[str | None] | None = None, **generation
) -> list[str]:
    """`caption` for one batch of already processed media: {"image": (B, C, H, W), "audio": (B, frames, mel)}."""
    model.head("caption")
    config = GenerationConfig.from_options(generation, max_new_tokens=model.config.caption.max_new_tokens)
    prompts = _prompts(prompt, next(iter(media.values())).shape[0] if media else None)
    max_length = model.config.text.max_length
    ids, mask = model.tokenizer(prompts, max_length, add_eos=False, padding_side="left")
    seq = model.sequence(media, ids.to(model.device), mask.to(model.device))
    if seq.mask.shape[1] + config.max_new_tokens > model.config.backbone.max_seq_len:
        raise InputError(
            f"prompt ({seq.mask.shape[1]} tokens) plus max_new_tokens ({config.max_new_tokens}) exceeds "
            f"backbone.max_seq_len ({model.config.backbone.max_seq_len})"
        )
    parts = model.decoder_parts()
    state = CachedDecoder(parts, seq, config.max_new_tokens) if config.use_cache else RecomputingDecoder(parts, seq)
    tok = model.tokenizer
    never = [tok.bos_id] if tok.pad_is_token else [tok.bos_id, tok.pad_id]  # CLIP's pad id is also "!"
    return [tok.decode(row) for row in generate(state, config, tok.eos_id, never)]


@torch.no_grad()
def classify(
    model: MultimodalModel,
    images: Sequence[Any] | None = None,
    audio: Sequence[Any] | None = None,
    labels: Sequence[str] | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> Classification:
    """Classifies every item with the trained head, or zero-shot against `labels` through embeddings.

    Zero-shot: each label is written into every template of `config.contrastive.templates`, the unit text
    embeddings of one label are averaged and normalised (`mmfm.zero_shot.zero_shot_weights`, open_clip's
    template ensembling), and probabilities are the softmax of the scaled cosine similarities, as in CLIP.

    Args:
        model: the model; it needs a classify head, or a contrastive head for zero-shot labels.
        images: paths, PIL images, arrays or tensors.
        audio: paths or (waveform, sample_rate) pairs; pass images or audio (both only for the trained head).
        labels: zero-shot class names, a list of distinct non-empty strings; None uses the trained head.
        batch_size: items classified at once.
        progress: show a progress bar over the batches.
    """
    if labels is None:
        head = model.head("classify")
        inputs = _media_inputs(model, images=images, audio=audio)
        classes = head.labels
        probs = torch.cat(
            [
                head.probabilities(model.classify_logits(_process(model, _rows(inputs, rows))).float()).cpu()
                for rows in batches(_count(inputs), batch_size, progress, "classify")
            ]
        )
    else:
        classes = _labels(labels)
        head = model.head("contrastive")
        modality, items = _one_modality(model, images=images, audio=audio)
        embed_text = partial(_embed_texts, model, batch_size=batch_size)
        text = zero_shot_weights(embed_text, classes, head.templates).to(model.device)  # (C, E)
        probs = torch.cat(
            [
                head.logits(model.embed_tensors(modality, _process(model, {modality: items[rows]})[modality]), text)
                .float()
                .softmax(dim=-1)
                .cpu()
                for rows in batches(len(items), batch_size, progress, "classify")
            ]
        )
    best = probs.argmax(dim=-1).tolist()
    return Classification([classes[i] for i in best], probs, classes)


@torch.no_grad()
def embed(
    model: MultimodalModel,
    text: str | Sequence[str] | None = None,
    images: Sequence[Any] | None = None,
    audio: Sequence[Any] | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> Tensor:
    """(N, E) unit embeddings of one modality's items, comparable across modalities by dot product.

    Args:
        model: the model; it needs a contrastive head.
        text: one text or a list of texts.
        images: paths, PIL images, arrays or tensors.
        audio: paths or (waveform, sample_rate) pairs.
        batch_size: items embedded at once.
        progress: show a progress bar over the batches.
    """
    model.head("contrastive")
    if text is not None:
        if images is not None or audio is not None:
            raise InputError("embed takes one modality at a time: text=, images= or audio=")
        texts = text_items(text)
        return _embed_texts(model, texts, batch_size, progress)
    modality, items = _one_modality(model, images=images, audio=audio)
    return torch.cat(
        [
            model.embed_tensors(modality, _process(model, {modality: items[rows]})[modality]).cpu()
            for rows in batches(len(items), batch_size, progress, "embed")
        ]
    )


@torch.no_grad()
def generate_image(
    model: MultimodalModel,
    text: str | Sequence[str] | None = None,
    images: Sequence[Any] | None = None,
    audio: Sequence[Any] | None = None,
    *,
    num_images: int = 1,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    scheduler: str | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> list[Image.Image]:
    """Generates images conditioned on texts, images (variations) or audio clips, or several of them together.

    Each item (a text, an image, a clip, or one of each at the same index) is one condition: the backbone
    reads its sequence, and the image_gen head's denoiser cross-attends to the resulting states.

    Args:
        model: the model; it needs an image_gen head.
        text: one prompt or a list of prompts.
        images: paths, PIL images, arrays or tensors, for image variations.
        audio: paths or (waveform, sample_rate) pairs.
        num_images: images per condition; the output holds them adjacently, condition by condition.
        guidance_scale: classifier-free guidance scale in [0, `mmfm.heads.image_gen.MAX_GUIDANCE_SCALE`], 1 for
            none (default `image_gen.guidance_scale`).
        num_inference_steps: denoising steps (default `image_gen.num_inference_steps`).
        scheduler: a name from `mmfm.config.SCHEDULERS` (default `image_gen.scheduler`).
        seed: makes the images reproducible (a whole number of 64 bits); give this or `generator`, not both.
        generator: a torch generator for the noise (None and no seed: torch's global RNG).
        image_size: side of the images (default `image_gen.image_size`).
        batch_size: most images denoised at once (default: all of them).
        progress: show a progress bar over the denoising steps.

    Returns:
        len(conditions) * num_images PIL images (mode L or RGB, by `image_gen.channels`).
    """
    head = model.head("image_gen")
    seed = check_seed("seed", seed)
    if seed is not None and generator is not None:
        raise InputError("pass seed= or generator=, not both")
    sampling = dict(
        scheduler=scheduler,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        num_images=num_images,
        image_size=image_size,
        batch_size=batch_size,
    )
    head.check_sampling(**sampling)  # before any media is read or the backbone runs
    texts = None if text is None else text_items(text)
    media = _process(model, _media_inputs(model, images=images, audio=audio))
    ids = mask = None
    if texts is not None:
        ids, mask = model.tokenizer(texts, model.config.text.max_length)
        ids, mask = ids.to(model.device), mask.to(model.device)
        if media and next(iter(media.values())).shape[0] != len(texts):
            raise InputError(f"got {len(texts)} texts for {next(iter(media.values())).shape[0]} media items")
    elif not media:
        raise InputError("generate_image needs text=, images= or audio= to condition on")
    if seed is not None:
        generator = torch.Generator(model.device).manual_seed(seed)
    cond, cond_mask = model.image_gen_condition(media, ids, mask)
    pixels = head.sample(cond, cond_mask, generator=generator, progress=progress, **sampling)
    return to_pil(pixels)


def to_pil(images: Tensor) -> list[Image.Image]:
    """(N, C, H, W) images in [0, 1] -> N 8-bit PIL images, mode L for one channel and RGB for three."""
    array = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in array]


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Pastes equally sized images row by row, `columns` to a row, into one image (blank cells stay black)."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new(images[0].mode, (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


# ---- helpers ----


def _media_inputs(model: MultimodalModel, **inputs: Sequence[Any] | None) -> dict[str, list[Any]]:
    """{modality: list of raw items} of the media arguments given (`images=` -> "image"), checked against the model."""
    by_argument = {spec.argument: modality for modality, spec in MEDIA.items()}
    media = {}
    for argument, items in inputs.items():
        if items is None:
            continue
        modality = by_argument[argument]
        model.require_modality(modality)
        media[modality] = _items(argument, items, modality)
        if not media[modality]:
            raise InputError(f"{argument}= is empty: pass at least one item")
    sizes = {m: len(items) for m, items in media.items()}
    if len(set(sizes.values())) > 1:
        raise InputError(f"every modality needs the same number of items, got {sizes}")
    return media


def _one_modality(model: MultimodalModel, **inputs: Sequence[Any] | None) -> tuple[str, list[Any]]:
    media = _media_inputs(model, **inputs)
    if len(media) != 1:
        raise InputError(f"pass exactly one of {', '.join(f'{k}=' for k in inputs)}; got {len(media)}")
    return next(iter(media.items()))


def _count(inputs: dict[str, list[Any]]) -> int:
    return len(next(iter(inputs.values())))


def _items(argument: str, items: object, modality: str) -> list[Any]:
    """The raw media items of `images=` or `audio=` as a list; one item, a str or an unordered collection refused.

    A list or tuple (any sequence) is taken as it is; for images also a 4-D array or tensor, as a batch along its
    first dimension. A string or path would otherwise be read character by character, a dict by its keys, and a
    set in an arbitrary order, so they are InputErrors that say what to pass instead.
    """
    what = "images" if modality == "image" else "audio items"
    if isinstance(items, (np.ndarray, Tensor)):
        if modality == "image" and items.ndim == 4:
            return list(items)
        hint = f"a list of {what}" + (" or a 4-D (B, ...) batch" if modality == "image" else "")
        raise InputError(f"{argument}= got one {items.ndim}-D array; pass {hint}, e.g. {argument}=[array]")
    if modality == "audio" and _is_audio_pair(items):
        raise InputError(f"{argument}= got one (waveform, sample_rate) pair; pass a list of them: {argument}=[(w, sr)]")
    if isinstance(items, (str, bytes, os.PathLike)):
        raise InputError(
            f"{argument}= must be a list of {what}, got the {type(items).__name__} {_shown(items)}; "
            f"for one item pass {argument}=[{_shown(items)}]"
        )
    if not isinstance(items, Sequence):
        raise InputError(f"{argument}= must be a list (or tuple) of {what}, got {_a(items)}{_why_not(items)}")
    return list(items)


def text_items(text: object) -> list[str]:
    """`text=` as a list of strings: one string is one text; a list or tuple of strings; anything else refused."""
    if isinstance(text, str):
        return [text]
    if not isinstance(text, Sequence) or isinstance(text, bytes):
        raise InputError(f"text= must be a string or a list (or tuple) of strings, got {_a(text)}{_why_not(text)}")
    texts = list(text)
    if not texts:
        raise InputError("text= is empty: pass at least one text")
    for i, item in enumerate(texts):
        if not isinstance(item, str):
            raise InputError(f"text[{i}] must be a str, got {_a(item)}")
    return texts


def _prompts(prompt: object, count: int | None) -> list[str]:
    """One prompt per item: `prompt` repeated `count` times when it is one string (or None), else its strings.

    `count` is the number of media items, or None for captions from prompts alone.
    """
    if prompt is None or isinstance(prompt, str):
        if count is None:
            if prompt is None:
                raise InputError("caption needs images=, audio= or a prompt")
            count = 1
        return [prompt or ""] * count
    if not isinstance(prompt, Sequence) or isinstance(prompt, bytes):
        raise InputError(f"prompt= must be a string or a list (or tuple) of strings, got {_a(prompt)}")
    prompts = list(prompt)
    for i, item in enumerate(prompts):
        if not isinstance(item, str):
            raise InputError(f"prompt[{i}] must be a str (use '' for no prompt), got {_a(item)}")
    if count is not None and len(prompts) != count:
        raise InputError(f"got {len(prompts)} prompts for {count} media items")
    if not prompts:
        raise InputError("prompt= is an empty list: pass one prompt, or images= or audio=")
    return prompts


def _labels(labels: object) -> list[str]:
    """Zero-shot class names: a list or tuple of distinct, non-empty strings."""
    if isinstance(labels, str):
        names = [part.strip() for part in labels.split(",")] if "," in labels else [labels]
        raise InputError(f"labels= must be a list of class names, got the str {_shown(labels)}; pass labels={names!r}")
    if not isinstance(labels, Sequence) or isinstance(labels, bytes):
        raise InputError(f"labels= must be a list (or tuple) of class names, got {_a(labels)}{_why_not(labels)}")
    classes = list(labels)
    if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        raise InputError(f"labels must be a non-empty list of non-empty strings, got {_shown(labels)}")
    repeat = first_repeat(classes)
    if repeat is not None:
        first, again = repeat
        raise InputError(
            f"labels= names {classes[again]!r} twice (positions {first} and {again}); each class must appear once, "
            "or its copies split its probability between them"
        )
    return classes


def first_repeat(labels: Sequence[str]) -> tuple[int, int] | None:
    """Positions (first, again) of the first label that repeats an earlier one, white space folded; None if none."""
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        key = " ".join(label.split())
        if key in seen:
            return seen[key], i
        seen[key] = i
    return None


def _is_audio_pair(item: object) -> bool:
    return (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], (np.ndarray, Tensor))
        and isinstance(item[1], (int, float, np.integer, np.floating))
    )


def _why_not(value: object) -> str:
    """Why a non-sequence cannot stand for a list of items: the end of an error message."""
    if isinstance(value, Mapping):
        return " (its keys would be taken as the items)"
    if isinstance(value, Set):
        return " (its order is arbitrary; pass a list)"
    return "; for one item pass a list of one"


def _a(value: object) -> str:
    """'a dict', 'an int', ... with a short repr of the value."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name} ({_shown(value)})"


def _shown(value: object) -> str:
    return reprlib.repr(value)


def _rows(inputs: dict[str, list[Any]], rows: slice) -> dict[str, list[Any]]:
    return {m: items[rows] for m, items in inputs.items()}


def batches(count: int, batch_size: int, progress: bool, what: str) -> Iterator[slice]:
    """Slices of at most `batch_size` items covering `count` items, with an optional progress bar."""
    batch_size = whole_number("batch_size", batch_size, 1)
    starts = range(0, count, batch_size)
    for start in tqdm(starts, desc=what, unit="batch", disable=not progress or len(starts) < 2):
        yield slice(start, min(start + batch_size, count))


def _process(model: MultimodalModel, inputs: dict[str, list[Any]]) -> dict[str, Tensor]:
    """Raw items -> processed tensors on the model's device, in its dtype."""
    return {m: model.processors[m](items).to(model.device, model.dtype) for m, items in inputs.items()}


def _embed_texts(
    model: MultimodalModel, texts: list[str], batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False
) -> Tensor:
    """(N, E) unit text embeddings on the CPU, `batch_size` texts at a time."""
    out = []
    for rows in batches(len(texts), batch_size, progress, "embed"):
        ids, mask = model.tokenizer(texts[rows], model.config.text.max_length)
        out.append(model.embed_tensors("text", ids.to(model.device), mask.to(model.device)).cpu())
    return torch.cat(out)
