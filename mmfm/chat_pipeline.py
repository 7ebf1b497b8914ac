"""Chat about images and sounds: conversations with `<image>`/`<audio>` placeholders in, the assistant's reply out.

```python
model = mmfm.load("runs/demo-chat/final")
model.chat([{"role": "user", "content": "<image>\\nWhich digit is this?"}], images=["seven.png"])   # "It is a seven."
history = [{"role": "user", "content": "<image> <audio>\\nWhat is the sum of the digit shown and the one spoken?"}]
for piece in model.chat(history, images=["3.png"], audio=["eight.wav"], stream=True):
    print(piece, end="", flush=True)
```

The k-th `<image>` in the conversation (counting through every turn) is `images[k]`, and likewise for audio; a
multi-turn chat passes its whole history back, with all the media it has named so far. The conversation is
rendered by the model's chat template with the assistant's turn opened (`mmfm.chat_format`), each item's media
tokens take its placeholder's place, and the reply is decoded with the KV cache as `generate_text` decodes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mmfm.chat_format import (
    ChatFormat,
    ChatInputs,
    EncodedConversation,
    check_media_counts,
    check_messages,
    pack,
)
from mmfm.config import DEFAULT_BATCH_SIZE, MEDIA_MODALITIES
from mmfm.data.collate import process_media
from mmfm.errors import InputError
from mmfm.text_generation import GenerationConfig
from mmfm.text_pipeline import (
    MultimodalModel,
    Started,
    check_prompt_lengths,
    conversation_list,
    is_conversation,
    respond,
    start,
)


def chat(
    model: MultimodalModel,
    messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
    images: Sequence[Any] | None = None,
    audio: Sequence[Any] | None = None,
    *,
    stream: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    **generation: Any,
) -> str | list[str] | Iterator[str]:
    """The assistant's reply to a conversation about images and sounds, or to each of a list of them.

    Args:
        model: a model with a chat template and a caption head (its LM head), and an encoder for each modality the
            conversation names.
        messages: one conversation (a list of {"role", "content"} turns; returns a str) or a list of them (returns
            a list). `<image>` and `<audio>` in the contents are placeholders for the media.
        images: for one conversation, its images in placeholder order (paths, PIL images, arrays); for a list of
            conversations, one such list per conversation.
        audio: likewise, audio items (paths or `(waveform, sample_rate)` pairs).
        stream: return an iterator of reply pieces as they are decoded (one conversation only).
        batch_size: conversations answered at once (left-padded to the longest).
        progress: a progress bar over the batches.
        **generation: `GenerationConfig` fields, as for `generate_text` (max_new_tokens, do_sample, temperature,
            top_k, top_p, repetition_penalty, stop, seed, num_beams, ...).

    Raises:
        InputError: a malformed conversation, placeholders that do not match the media given, a modality the model
            has no encoder for, media that cannot be loaded (named by position), a conversation too long to answer.
    """
    model.head("caption")
    config = GenerationConfig.from_options(generation, max_new_tokens=model.config.caption.max_new_tokens)
    single = is_conversation(messages)
    conversations = [messages] if single else conversation_list(messages)
    given = {"image": images, "audio": audio}
    media = [{m: _media_list(given[m], m, i, single) for m in MEDIA_MODALITIES} for i in range(len(conversations))]
    if not single:
        for m, value in given.items():
            if value is not None and len(value) != len(conversations):
                raise InputError(
                    f"{m} must hold one list per conversation: {len(conversations)} conversations, {len(value)} lists"
                )
    chat_format = ChatFormat.from_model(model)
    prompts = [
        (encode_conversation(chat_format, conversation, items, "messages" if single else f"messages[{i}]"), items)
        for i, (conversation, items) in enumerate(zip(conversations, media))
    ]
    check_prompt_lengths(model, [len(encoded) for encoded, _ in prompts], "conversation")
    return respond(
        model, prompts, _start, config, stream=stream, batch_size=batch_size, progress=progress, single=single
    )


def encode_conversation(
    chat_format: ChatFormat, messages: Any, media: Mapping[str, Sequence[Any]], what: str = "messages"
) -> EncodedConversation:
    """One conversation checked against its media (one item per placeholder) and encoded with its assistant turn
    opened, as `chat` answers it.

    Raises:
        InputError: a malformed conversation, or placeholders that do not match the media given.
    """
    turns = check_messages(messages, what)
    check_media_counts(turns, {m: len(v) for m, v in media.items()}, what)
    return chat_format.encode(turns, generation_prompt=True, what=what)


def process_conversation_media(model: MultimodalModel, media: Mapping[str, Sequence[Any]]) -> dict[str, list[Tensor]]:
    """One conversation's media items loaded and processed: {modality: [processed item, ...]}.

    Raises:
        InputError: an item that cannot be loaded, named by modality and position.
    """
    return {
        m: [process_media(m, model.processors[m], value, index) for index, value in enumerate(values)]
        for m, values in media.items()
        if values
    }


@torch.no_grad()
def start_processed(
    model: MultimodalModel,
    prompts: Sequence[tuple[EncodedConversation, Mapping[str, Sequence[Tensor]]]],
    config: GenerationConfig,
) -> Started:
    """The decoder primed with left-padded encoded conversations and their processed media."""
    inputs = pack([e for e, _ in prompts], [p for _, p in prompts], model.tokenizer.pad_id, padding_side="left")
    inputs = _on_model(inputs, model)
    seq = model.chat_sequence(inputs)
    prompt = inputs.ids.masked_fill(~inputs.mask | (inputs.blocks >= 0), -1)  # text of the prompt, for the penalty
    return start(model, seq, prompt, config)


def _start(model: MultimodalModel, prompts: list, config: GenerationConfig) -> Started:
    """The decoder primed with left-padded conversations whose media are loaded and processed now."""
    return start_processed(model, [(e, process_conversation_media(model, items)) for e, items in prompts], config)


def _on_model(inputs: ChatInputs, model: MultimodalModel) -> ChatInputs:
    """The inputs on the model's device, media in its dtype."""
    moved = inputs.apply(lambda t: t.to(model.device))
    moved.media = {m: x.to(model.dtype) for m, x in moved.media.items()}
    return moved


def _media_list(value: Any, modality: str, row: int, single: bool) -> list:
    """The items of one conversation's modality, as a list."""
    if value is None:
        return []
    if not single:
        if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
            raise InputError(f"{modality} must hold one list of items per conversation")
        value = value[row] if row < len(value) else []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InputError(
            f"{modality} must be a list of items (paths, PIL images, arrays...), got {type(value).__name__}; "
            f"wrap one item in a list"
        )
    return list(value)
