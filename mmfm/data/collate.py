"""Turns a list of dataset items into one `Batch` of padded tensors, with a mask per modality.

Items may lack any modality: a missing image or clip is a row of zeros with False in `has_image`/`has_audio`, a
missing caption, audio caption or text a row of padding with False in `has_caption`/`has_audio_caption`/`has_text`,
a missing label -1. The `Collator` runs in DataLoader workers, so it only holds picklable state (processors and a
tokenizer).

Conversation items (`messages`, see `mmfm.data.manifest`) are encoded with the model's chat format (unless the
dataset did that already) and packed, right-padded, into `Batch.chat` with their media.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mmfm.data.manifest import CAPTION_KEYS
from mmfm.errors import InputError

if TYPE_CHECKING:
    from mmfm.chat_format import ChatFormat, ChatInputs
    from mmfm.encoders.tokenizers import Tokenizer

MEDIA = ("image", "audio")


@dataclass
class Batch:
    """One collated batch of B examples.

    Attributes:
        index: (B,) long dataset indices.
        image: (B, C, H, W) float pixels, zeros where an item has no image; None when no item has one.
        has_image: (B,) bool, True where the item has an image.
        audio: (B, frames, mel) float features, zeros where an item has no clip; None when no item has one.
        has_audio: (B,) bool.
        caption_ids: (B, T) long ids, `[BOS, tokens..., EOS]` right-padded; None when no item has a caption.
        caption_mask: (B, T) bool, True on real tokens; all False on rows without a caption.
        has_caption: (B,) bool.
        audio_caption_ids: (B, T') long ids of the captions of the sounds (`audio_caption`), laid out as
            `caption_ids` (T' may differ from T); None when no item has one.
        audio_caption_mask: (B, T') bool.
        has_audio_caption: (B,) bool.
        text_ids: (B, T) long ids of the text-only examples, laid out as `caption_ids`; or None.
        text_mask: (B, T) bool.
        has_text: (B,) bool.
        label: (B,) long index into the collator's classes, -1 where an item has no label (or there are no classes).
        captions: every item's reference captions, an empty list where it has none (for evaluation metrics).
        audio_captions: every item's reference audio captions, likewise.
        has_chat: (B,) bool, True where the item is a conversation.
        chat: the conversations of the `has_chat` rows (in batch order) with their media; None when there are none.
    """

    index: Tensor
    image: Tensor | None
    has_image: Tensor
    audio: Tensor | None
    has_audio: Tensor
    caption_ids: Tensor | None
    caption_mask: Tensor | None
    has_caption: Tensor
    audio_caption_ids: Tensor | None
    audio_caption_mask: Tensor | None
    has_audio_caption: Tensor
    text_ids: Tensor | None
    text_mask: Tensor | None
    has_text: Tensor
    label: Tensor
    captions: list[list[str]]
    audio_captions: list[list[str]]
    has_chat: Tensor
    chat: ChatInputs | None = None

    def __len__(self) -> int:
        return self.index.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on `device` (`non_blocking` as in `Tensor.to`; useful after pinning)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy in page-locked memory; `DataLoader(pin_memory=True)` calls this."""
        return self._map(Tensor.pin_memory)

    def _map(self, fn: Any) -> Batch:
        changes = {f.name: fn(v) for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), Tensor)}
        if self.chat is not None:
            changes["chat"] = self.chat.apply(fn)
        return dataclasses.replace(self, **changes)


class Collator:
    """Processes and pads a list of dataset items into a `Batch`; pass it as a DataLoader's `collate_fn`.

    An item's `image` may be anything the image processor loads (a path, a PIL image, an array) and its `audio` a
    path or a `(waveform, sample_rate)` pair; a torch tensor there is taken as already processed (one item's
    processor output, as `cache_media` stores it) and used as it is.

    Args:
        processors: the model's processors by modality (`model.processors`); items may only carry media these cover.
        tokenizer: the model's tokenizer.
        max_length: most ids per caption or text, BOS and EOS included (`config.text.max_length`).
        classes: class names in the classifier's order; labels are turned into their positions. None ignores labels
            (every row gets -1), for models without a classify head.
        chat_format: encodes conversation items (`ChatFormat.from_model`); None for a model that cannot read them.
    """

    def __init__(
        self,
        processors: dict[str, Any],
        tokenizer: Tokenizer,
        max_length: int,
        classes: Sequence[str] | None = None,
        chat_format: ChatFormat | None = None,
    ) -> None:
        self.processors = dict(processors)
        self.chat_format = chat_format
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.classes = None if classes is None else list(classes)
        self._class_index = None if classes is None else {c: i for i, c in enumerate(self.classes)}

    @classmethod
    def from_model(cls, model: Any) -> Collator:
        """The collator that feeds `model` (a `MultimodalModel`; this module does not import the model, which
        imports it through the chat pipeline): its processors, tokenizer, text length, classify labels and chat
        format."""
        from mmfm.chat_format import chat_format_of

        config = model.config
        classes = config.classify.labels if config.classify is not None else None
        return cls(model.processors, model.tokenizer, config.text.max_length, classes, chat_format_of(model))

    def __call__(self, items: Sequence[dict[str, Any]]) -> Batch:
        """Collates dataset items.

        Raises:
            InputError: the list is empty, an item carries a modality the processors do not cover, a medium
                cannot be loaded, or a label is not one of the classes; the message names the item's index.
        """
        if not items:
            raise InputError("cannot collate an empty list of items")
        B = len(items)
        media: dict[str, Tensor | None] = {}
        present: dict[str, Tensor] = {}
        for modality in MEDIA:
            rows = [(i, item[modality]) for i, item in enumerate(items) if item.get(modality) is not None]
            present[modality] = _mask(B, [i for i, _ in rows])
            if not rows:
                media[modality] = None
                continue
            if modality not in self.processors:
                raise InputError(
                    f"item {items[rows[0][0]]['index']} carries {modality}, but the collator has no {modality} "
                    f"processor (it has: {', '.join(self.processors) or 'none'})"
                )
            processor = self.processors[modality]
            tensors = [process_media(modality, processor, value, items[i]["index"]) for i, value in rows]
            out = tensors[0].new_zeros((B, *tensors[0].shape))  # (B, C, H, W) or (B, frames, mel)
            for (i, _), tensor in zip(rows, tensors):
                out[i] = tensor
            media[modality] = out
        caption_ids, caption_mask, has_caption = self._tokenize(items, "caption")
        audio_caption_ids, audio_caption_mask, has_audio_caption = self._tokenize(items, "audio_caption")
        text_ids, text_mask, has_text = self._tokenize(items, "text")
        return Batch(
            index=torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
            image=media["image"],
            has_image=present["image"],
            audio=media["audio"],
            has_audio=present["audio"],
            caption_ids=caption_ids,
            caption_mask=caption_mask,
            has_caption=has_caption,
            audio_caption_ids=audio_caption_ids,
            audio_caption_mask=audio_caption_mask,
            has_audio_caption=has_audio_caption,
            text_ids=text_ids,
            text_mask=text_mask,
            has_text=has_text,
            label=self._labels(items),
            captions=[_references(item, "caption") for item in items],
            audio_captions=[_references(item, "audio_caption") for item in items],
            has_chat=_mask(B, [i for i, item in enumerate(items) if "messages" in item]),
            chat=self._conversations([item for item in items if "messages" in item]),
        )

    def _tokenize(self, items: Sequence[dict[str, Any]], key: str) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """(B, T) right-padded ids and mask of `items[i][key]` where present, pad rows elsewhere; and the (B,) mask."""
        rows = [i for i, item in enumerate(items) if item.get(key) is not None]
        has = _mask(len(items), rows)
        if not rows:
            return None, None, has
        ids, mask = self.tokenizer([items[i][key] for i in rows], self.max_length)  # (n, T)
        full_ids = torch.full((len(items), ids.shape[1]), self.tokenizer.pad_id, dtype=torch.long)
        full_mask = torch.zeros((len(items), ids.shape[1]), dtype=torch.bool)
        full_ids[rows], full_mask[rows] = ids, mask
        return full_ids, full_mask, has

    def _conversations(self, items: Sequence[dict[str, Any]]) -> ChatInputs | None:
        """The conversation items encoded and packed with their processed media, or None when there are none."""
        from mmfm.chat_format import pack

        if not items:
            return None
        if self.chat_format is None:
            raise InputError(
                f"item {items[0]['index']} is a conversation, but the model has no chat template to read it with"
            )
        encoded, media = [], []
        for item in items:
            conversation = item.get("conversation")
            if conversation is None:
                conversation = self.chat_format.encode(item["messages"], what=f"item {item['index']}: messages")
            encoded.append(conversation)
            used = conversation.counts()
            # a truncated conversation reads only its first items; the chat format refused modalities without encoder
            media.append(
                {
                    m: [process_media(m, self.processors[m], v, item["index"]) for v in values[: used[m]]]
                    for m, values in item["media"].items()
                    if used[m]
                }
            )
        return pack(encoded, media, self.tokenizer.pad_id)

    def _labels(self, items: Sequence[dict[str, Any]]) -> Tensor:
        labels = torch.full((len(items),), -1, dtype=torch.long)
        if self._class_index is None:
            return labels
        for i, item in enumerate(items):
            label = item.get("label")
            if label is None:
                continue
            if label not in self._class_index:
                shown = ", ".join(self.classes[:10]) + (", ..." if len(self.classes) > 10 else "")
                raise InputError(f"item {item['index']}: label {label!r} is not one of the classes ({shown})")
            labels[i] = self._class_index[label]
        return labels


def process_media(modality: str, processor: Any, value: Any, index: int) -> Tensor:
    """One item's processed image (C, H, W) or audio features (frames, mel); a tensor is taken as already processed.

    Args:
        modality: "image" or "audio".
        processor: the modality's `ImageProcessor` or `AudioProcessor`.
        value: what the item holds: a path, PIL image, array or `(waveform, sample_rate)` pair, or a processed tensor.
        index: the item's dataset index, named in errors.

    Raises:
        InputError: the medium cannot be loaded, or a tensor does not have the processor's output shape.
    """
    expected = _processed_shape(modality, processor)
    if isinstance(value, Tensor):
        if tuple(value.shape) != expected:
            raise InputError(
                f"{modality} {index}: a tensor in a dataset item is taken as processed {modality} of shape "
                f"{expected}, got shape {tuple(value.shape)}; pass raw media as a path, PIL image or array"
            )
        return value.float()
    if modality == "image":
        return processor.transform(processor.load(value, index=index))  # (C, H, W)
    return processor.features(processor.load(value, index=index), index=index)  # (frames, mel)


def _processed_shape(modality: str, processor: Any) -> tuple[int, ...]:
    if modality == "image":
        _, height, width = processor.data_config["input_size"]
        return (processor.in_chans, height, width)
    return (processor.config.target_frames, processor.config.num_mel_bins)


def _references(item: dict[str, Any], key: str) -> list[str]:
    """An item's references for `key` ("caption", "audio_caption"): its list of all, else the one it has, else none."""
    return list(item.get(CAPTION_KEYS[key], [item[key]] if key in item else []))


def _mask(size: int, rows: list[int]) -> Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[rows] = True
    return mask
