"""Pipelines: raw inputs in, Python values out, around a `MultimodalModel` that only sees tensors.

Each pipeline turns paths, PIL images, arrays and (waveform, rate) pairs into tensors with the model's
processors, feeds the model `batch_size` items at a time (so memory stays flat however many items there are),
and returns captions, class probabilities, embeddings or images. `model.caption(...)` and its siblings are
thin forwards to these functions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmfm.config import DEFAULT_BATCH_SIZE, MEDIA
from mmfm.decoding import CachedDecoder, RecomputingDecoder
from mmfm.errors import InputError
from mmfm.text_generation import GenerationConfig, generate

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
        """The k most likely (class, probability) pairs of every item, best first."""
        values, index = self.probs.topk(min(k, len(self.classes)), dim=-1)
        return [[(self.classes[i], p) for i, p in zip(ix, vs)] for ix, vs in zip(index.tolist(), values.tolist())]

    def above(self, threshold: float = 0.5) -> list[list[str]]:
        """Every class whose probability reaches `threshold`, per item (the multi-label reading)."""
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
    inputs = _media_inputs(model, images=images, audio=audio)
    count = _count(inputs) if inputs else _prompt_count(prompt)
    prompts = [prompt] * count if prompt is None or isinstance(prompt, str) else list(prompt)
    if len(prompts) != count:
        raise InputError(f"got {len(prompts)} prompts for {count} media items")
    out: list[str] = []
    for rows in _batches(count, batch_size, progress, "caption"):
        media = _process(model, _rows(inputs, rows))
        out += caption_tensors(model, media, prompts[rows], **generation)
    return out


@torch.no_grad()
def caption_tensors(
    model: MultimodalModel, media: dict[str, Tensor], prompt: str | Sequence[str | None] | None = None, **generation
) -> list[str]:
    """`caption` for one batch of already processed media: {"image": (B, C, H, W), "audio": (B, frames, mel)}."""
    model.head("caption")
    batch = next(iter(media.values())).shape[0] if media else _prompt_count(prompt)
    prompts = [prompt] * batch if prompt is None or isinstance(prompt, str) else list(prompt)
    if len(prompts) != batch:
        raise InputError(f"got {len(prompts)} prompts for {batch} media items")
    max_length = model.config.text.max_length
    ids, mask = model.tokenizer([p or "" for p in prompts], max_length, add_eos=False, padding_side="left")
    seq = model.sequence(media, ids.to(model.device), mask.to(model.device))
    config = GenerationConfig(**{"max_new_tokens": model.config.caption.max_new_tokens, **generation})
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

    Zero-shot: each label is written into every template of `config.contrastive.templates`, the text
    embeddings of one label are averaged, and probabilities are the softmax of the scaled cosine
    similarities, as in CLIP.

    Args:
        model: the model; it needs a classify head, or a contrastive head for zero-shot labels.
        images: paths, PIL images, arrays or tensors.
        audio: paths or (waveform, sample_rate) pairs; pass images or audio (both only for the trained head).
        labels: zero-shot class names; None uses the trained head.
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
                for rows in _batches(_count(inputs), batch_size, progress, "classify")
            ]
        )
    else:
        classes = list(labels)
        if not classes or not all(isinstance(c, str) and c for c in classes):
            raise InputError(f"labels must be a non-empty list of non-empty strings, got {labels!r}")
        head = model.head("contrastive")
        modality, items = _one_modality(model, images=images, audio=audio)
        prompts = [t.format(c) for c in classes for t in head.templates]
        text = _embed_texts(model, prompts, batch_size).view(len(classes), len(head.templates), -1).mean(dim=1)
        text = torch.nn.functional.normalize(text, dim=-1).to(model.device)  # (C, E)
        probs = torch.cat(
            [
                head.logits(model.embed_tensors(modality, _process(model, {modality: items[rows]})[modality]), text)
                .float()
                .softmax(dim=-1)
                .cpu()
                for rows in _batches(len(items), batch_size, progress, "classify")
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
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise InputError("text= is empty: pass at least one text")
        return _embed_texts(model, texts, batch_size, progress)
    modality, items = _one_modality(model, images=images, audio=audio)
    return torch.cat(
        [
            model.embed_tensors(modality, _process(model, {modality: items[rows]})[modality]).cpu()
            for rows in _batches(len(items), batch_size, progress, "embed")
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
        guidance_scale: classifier-free guidance scale >= 0, 1 for none (default `image_gen.guidance_scale`).
        num_inference_steps: denoising steps (default `image_gen.num_inference_steps`).
        scheduler: a name from `mmfm.config.SCHEDULERS` (default `image_gen.scheduler`).
        seed: makes the images reproducible; give this or `generator`, not both.
        generator: a torch generator for the noise (None and no seed: torch's global RNG).
        image_size: side of the images (default `image_gen.image_size`).
        batch_size: most images denoised at once (default: all of them).
        progress: show a progress bar over the denoising steps.

    Returns:
        len(conditions) * num_images PIL images (mode L or RGB, by `image_gen.channels`).
    """
    head = model.head("image_gen")
    if seed is not None and generator is not None:
        raise InputError("pass seed= or generator=, not both")
    media = _process(model, _media_inputs(model, images=images, audio=audio))
    ids = mask = None
    if text is not None:
        texts = [text] if isinstance(text, str) else list(text)
        ids, mask = model.tokenizer(texts, model.config.text.max_length)
        ids, mask = ids.to(model.device), mask.to(model.device)
        if media and next(iter(media.values())).shape[0] != len(texts):
            raise InputError(f"got {len(texts)} texts for {next(iter(media.values())).shape[0]} media items")
    elif not media:
        raise InputError("generate_image needs text=, images= or audio= to condition on")
    if seed is not None:
        generator = torch.Generator(model.device).manual_seed(seed)
    cond, cond_mask = model.image_gen_condition(media, ids, mask)
    pixels = head.sample(
        cond,
        cond_mask,
        scheduler=scheduler,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generator,
        num_images=num_images,
        image_size=image_size,
        batch_size=batch_size,
        progress=progress,
    )
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
        media[modality] = list(items)
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


def _prompt_count(prompt: str | Sequence[str | None] | None) -> int:
    if prompt is None:
        raise InputError("caption needs images=, audio= or a prompt")
    return 1 if isinstance(prompt, str) else len(prompt)


def _rows(inputs: dict[str, list[Any]], rows: slice) -> dict[str, list[Any]]:
    return {m: items[rows] for m, items in inputs.items()}


def _batches(count: int, batch_size: int, progress: bool, what: str) -> Iterator[slice]:
    """Slices of at most `batch_size` items covering `count` items, with an optional progress bar."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
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
    for rows in _batches(len(texts), batch_size, progress, "embed"):
        ids, mask = model.tokenizer(texts[rows], model.config.text.max_length)
        out.append(model.embed_tensors("text", ids.to(model.device), mask.to(model.device)).cpu())
    return torch.cat(out)
