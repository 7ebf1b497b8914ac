"""Conversations with media as the backbone reads them: token ids, interleaved media slots, and the loss mask.

A conversation is a list of `{"role", "content"}` turns whose contents may hold `<image>` and `<audio>`
placeholders, any number of them, anywhere, in any turn; the k-th `<image>` is the k-th image given with the
conversation. The model's chat template renders the turns to text; the text is split at the placeholders,
each piece tokenized as it stands (special tokens included), and each placeholder becomes as many positions as
the model turns one item of that modality into (`model.num_media_tokens`), where the projected media tokens go.

For training, the supervised tokens are each assistant turn as the template writes the reply: everything the
template renders after the assistant's turn is opened (`add_generation_prompt`) up to the next turn, which for
ChatML is the reply and its `<|im_end|>` line end. Media tokens are never supervised. A reply that holds none of
the tokenizer's EOS tokens (a template that writes no end-of-turn token, as with mmfm's own byte tokenizer) gets
the EOS id appended, so that the model learns where replies stop.

A conversation longer than the limit (`text.max_length` tokens in all, media included) is cut at the end, and
never inside an item's media tokens: an item that would be cut is dropped whole, with everything after it. A
conversation left with no supervised token is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mmfm.config import MEDIA_MODALITIES, TextConfig
from mmfm.errors import InputError

PLACEHOLDERS = {modality: f"<{modality}>" for modality in MEDIA_MODALITIES}  # {"image": "<image>", ...}
ROLES = ("system", "user", "assistant")

_PLACEHOLDER = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS.values()))
_MODALITY_OF = {p: m for m, p in PLACEHOLDERS.items()}


@dataclass
class EncodedConversation:
    """One conversation as positions of the backbone's sequence.

    Attributes:
        ids: a token id per position; media positions hold `pad_id` (their embeddings come from the media).
        supervised: per position, True where the token is trained to be predicted (assistant replies).
        media: (modality, item index within that modality's list, first position, end position) of every media
            item, in order.
        truncated: the conversation was cut to the limit.
    """

    ids: list[int]
    supervised: list[bool]
    media: list[tuple[str, int, int, int]] = field(default_factory=list)
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    def counts(self) -> dict[str, int]:
        """How many items of each modality the conversation (as kept) reads."""
        return {m: sum(1 for item in self.media if item[0] == m) for m in MEDIA_MODALITIES}


@dataclass
class ChatInputs:
    """A batch of encoded conversations as tensors, with the processed media they interleave.

    Attributes:
        ids: (B, L) token ids, padded with `pad_id` (media positions hold it too).
        mask: (B, L) True on real positions (text and media).
        supervised: (B, L) True where the token is trained to be predicted.
        blocks: (B, L) the media item each position belongs to, numbered within the row; -1 on text and padding.
        media: processed items by modality, (N, C, H, W) pixels or (N, frames, mel) features.
        slots: by modality, (N, 2) long: the row of each item and its first position.
    """

    ids: Tensor
    mask: Tensor
    supervised: Tensor
    blocks: Tensor
    media: dict[str, Tensor]
    slots: dict[str, Tensor]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def apply(self, fn: Any) -> ChatInputs:
        """A copy with `fn` applied to every tensor (`Batch.to` and `Batch.pin_memory` use it)."""
        return ChatInputs(
            fn(self.ids),
            fn(self.mask),
            fn(self.supervised),
            fn(self.blocks),
            {m: fn(x) for m, x in self.media.items()},
            {m: fn(x) for m, x in self.slots.items()},
        )


def pack(
    conversations: Sequence[EncodedConversation],
    media: Sequence[Mapping[str, Sequence[Tensor]]],
    pad_id: int,
    padding_side: str = "right",
) -> ChatInputs:
    """Pads encoded conversations into one batch and gathers the media items they keep.

    Args:
        conversations: one per row.
        media: per row, the processed items by modality, in placeholder order (items a truncated conversation no
            longer reads are left out).
        pad_id: the id of padding positions.
        padding_side: "right" for training, "left" for prompts to generate from.
    """
    B, L = len(conversations), max(len(c) for c in conversations)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.bool)
    supervised = torch.zeros((B, L), dtype=torch.bool)
    blocks = torch.full((B, L), -1, dtype=torch.long)
    items: dict[str, list[Tensor]] = {m: [] for m in MEDIA_MODALITIES}
    slots: dict[str, list[tuple[int, int]]] = {m: [] for m in MEDIA_MODALITIES}
    for row, conversation in enumerate(conversations):
        n = len(conversation)
        offset = L - n if padding_side == "left" else 0
        ids[row, offset : offset + n] = torch.tensor(conversation.ids, dtype=torch.long)
        mask[row, offset : offset + n] = True
        supervised[row, offset : offset + n] = torch.tensor(conversation.supervised, dtype=torch.bool)
        for block, (modality, index, start, end) in enumerate(conversation.media):
            items[modality].append(media[row][modality][index])
            slots[modality].append((row, offset + start))
            blocks[row, offset + start : offset + end] = block
    return ChatInputs(
        ids,
        mask,
        supervised,
        blocks,
        {m: torch.stack(x) for m, x in items.items() if x},
        {m: torch.tensor(slots[m], dtype=torch.long) for m, x in items.items() if x},
    )


def check_messages(messages: Any, what: str = "messages") -> list[dict[str, str]]:
    """The turns of a conversation, checked: a non-empty list of {"role", "content"} dicts with known roles.

    Raises:
        InputError: naming `what` and the turn that is wrong.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InputError(f"{what} must be a non-empty list of {{'role', 'content'}} turns, got {_kind(messages)}")
    turns = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, Mapping):
            raise InputError(f"{what}[{i}] must be a {{'role', 'content'}} object, got {_kind(turn)}")
        extra = sorted(set(turn) - {"role", "content"})
        if extra:
            raise InputError(f"{what}[{i}] has unknown key {extra[0]!r} (a turn holds 'role' and 'content')")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise InputError(f"{what}[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise InputError(f"{what}[{i}].content must be a string, got {_kind(content)}")
        turns.append({"role": role, "content": content})
    return turns


def count_placeholders(messages: Sequence[Mapping[str, str]]) -> dict[str, int]:
    """{"image": n, "audio": m}: the placeholders in all turns' contents."""
    counts = dict.fromkeys(MEDIA_MODALITIES, 0)
    for turn in messages:
        for match in _PLACEHOLDER.findall(turn["content"]):
            counts[_MODALITY_OF[match]] += 1
    return counts


def check_media_counts(messages: Sequence[Mapping[str, str]], given: Mapping[str, int], what: str) -> None:
    """Refuses a conversation whose placeholders do not match the media given with it, naming both counts."""
    wanted = count_placeholders(messages)
    for m in MEDIA_MODALITIES:
        if wanted[m] != given.get(m, 0):
            raise InputError(
                f"{what} hold{'s' if wanted[m] == 1 else ''} {wanted[m]} {PLACEHOLDERS[m]} placeholder"
                f"{'' if wanted[m] == 1 else 's'} but {given.get(m, 0)} {m} item{'' if given.get(m, 0) == 1 else 's'} "
                f"{'was' if given.get(m, 0) == 1 else 'were'} given; each placeholder takes the next item in order"
            )


class ChatFormat:
    """Turns conversations into `EncodedConversation`s for one model: its tokenizer, chat template and media sizes.

    Args:
        tokenizer: the model's tokenizer (it must recognise the template's special tokens in text).
        text: the model's text config: chat template, BOS/EOS strings and `max_length`, the limit.
        media_tokens: positions one item of each media modality takes (`model.num_media_tokens`); a modality the
            model has no encoder for is absent.
        pad_id: the id media positions hold.
    """

    def __init__(self, tokenizer: Any, text: TextConfig, media_tokens: Mapping[str, int], pad_id: int):
        if text.chat_template is None:
            raise InputError("this model has no chat template (text.chat_template), so it cannot read conversations")
        self.tokenizer = tokenizer
        self.text = text
        self.media_tokens = dict(media_tokens)
        self.pad_id = pad_id
        self.limit = text.max_length
        self.eos_ids = set(getattr(tokenizer, "eos_ids", [tokenizer.eos_id]))
        self.eos_id = tokenizer.eos_id

    @classmethod
    def from_model(cls, model: Any) -> ChatFormat:
        media = {m: model.num_media_tokens(m) for m in model.projectors}
        return cls(model.tokenizer, model.config.text, media, model.tokenizer.pad_id)

    def render(self, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
        """The conversation as the chat template writes it (the assistant's turn opened with `generation_prompt`)."""
        return render_conversation(self.text, messages, generation_prompt)

    def encode(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        generation_prompt: bool = False,
        what: str = "messages",
    ) -> EncodedConversation:
        """Positions of a checked conversation (`check_messages`); see the module docstring.

        Args:
            messages: the turns.
            generation_prompt: end with the assistant's turn opened, to generate the reply (a prompt: nothing is
                supervised and nothing is cut; the caller checks the length).
            what: names the conversation in errors.

        Raises:
            InputError: a placeholder of a modality the model has no encoder for; a training conversation (no
                generation prompt) without an assistant turn, or with none left within the limit; a template
                that does not write replies after the opened turn.
        """
        counts = count_placeholders(messages)
        for m, n in counts.items():
            if n and m not in self.media_tokens:
                raise InputError(
                    f"{what} hold{'s' if n == 1 else ''} {n} {PLACEHOLDERS[m]} placeholder{'s' if n != 1 else ''}, "
                    f"but the model has no {m} encoder (it reads: {', '.join(self.media_tokens) or 'text only'})"
                )
        full = self.render(messages, generation_prompt)
        spans = [] if generation_prompt else self._reply_spans(messages, full, what)
        # Cut points: placeholders and the edges of every reply; each piece between them is tokenized on its own.
        cuts = sorted({0, len(full), *(p for span in spans for p in span)})
        ids: list[int] = []
        supervised: list[bool] = []
        media: list[tuple[str, int, int, int]] = []
        seen = dict.fromkeys(MEDIA_MODALITIES, 0)
        reply_start = 0  # where the current reply's tokens begin
        for start, end in zip(cuts, cuts[1:]):
            inside = any(a <= start and end <= b for a, b in spans)
            if inside and any(a == start for a, _ in spans):
                reply_start = len(ids)
            last = start
            for match in _PLACEHOLDER.finditer(full, start, end):
                self._add_text(full[last : match.start()], inside, ids, supervised)
                modality = _MODALITY_OF[match.group()]
                size = self.media_tokens[modality]
                media.append((modality, seen[modality], len(ids), len(ids) + size))
                seen[modality] += 1
                ids += [self.pad_id] * size
                supervised += [False] * size
                last = match.end()
            self._add_text(full[last:end], inside, ids, supervised)
            if inside and any(b == end for _, b in spans) and not self._ends_turn(ids, supervised, reply_start):
                ids.append(self.eos_id)  # a reply must teach the model to stop (see the module docstring)
                supervised.append(True)
        encoded = EncodedConversation(ids, supervised, media)
        if generation_prompt:
            return encoded
        encoded = self._truncated(encoded)
        if not any(encoded.supervised):
            raise InputError(
                f"{what}: no assistant reply starts within the limit of {self.limit} tokens (text.max_length); "
                f"the conversation takes {len(ids)}"
            )
        return encoded

    def _reply_spans(self, messages: Sequence[Mapping[str, str]], full: str, what: str) -> list[tuple[int, int]]:
        """[start, end) character spans of `full` that the template writes as each assistant reply."""
        spans = []
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            opened = self.render(messages[:i], generation_prompt=True)
            replied = self.render(messages[: i + 1], generation_prompt=False)
            if not (replied.startswith(opened) and full.startswith(replied)):
                raise InputError(
                    f"{what}[{i}]: the chat template does not write this reply after the assistant's opened turn, "
                    "so its tokens cannot be told apart for the loss"
                )
            if len(replied) > len(opened):
                spans.append((len(opened), len(replied)))
        if not spans:
            raise InputError(f"{what}: the conversation has no assistant turn to learn from")
        return spans

    def _ends_turn(self, ids: list[int], supervised: list[bool], start: int) -> bool:
        """Whether the reply whose tokens begin at `start` holds an EOS token among its text (not media) tokens."""
        return any(target and token in self.eos_ids for token, target in zip(ids[start:], supervised[start:]))

    def _add_text(self, text: str, inside: bool, ids: list[int], supervised: list[bool]) -> None:
        if text:
            pieces = self.tokenizer.encode(text)
            ids += pieces
            supervised += [inside] * len(pieces)

    def _truncated(self, encoded: EncodedConversation) -> EncodedConversation:
        """The conversation cut to `limit` positions, never inside an item's media tokens."""
        end = self.limit
        if len(encoded) <= end:
            return encoded
        kept = []
        for item in encoded.media:
            if item[3] > end:  # this item would be cut (or lies beyond): it goes, and everything after it
                end = min(end, item[2])
                break
            kept.append(item)
        return EncodedConversation(encoded.ids[:end], encoded.supervised[:end], kept, truncated=True)


def render_conversation(text: TextConfig, messages: Sequence[Mapping[str, Any]], generation_prompt: bool) -> str:
    """A conversation as the model's chat template (`text.chat_template`, with its BOS and EOS strings) writes it,
    the assistant's turn opened with `generation_prompt`."""
    from mmfm.chat_template import render_chat

    return render_chat(
        text.chat_template,
        messages,
        add_generation_prompt=generation_prompt,
        bos_token=text.bos_token,
        eos_token=text.eos_token,
    )


def chat_format_of(model: Any) -> ChatFormat | None:
    """The model's `ChatFormat`, or None when it has no chat template (it cannot read conversations)."""
    return ChatFormat.from_model(model) if model.config.text.chat_template is not None else None


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
