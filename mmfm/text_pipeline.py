"""Text generation from text: prompts or chat conversations in, the model's continuations out, whole or streamed.

```python
model = mmfm.load("SmolLM2-135M-Instruct.Q4_1.gguf")
model.generate_text("The capital of France is", max_new_tokens=8)              # -> " Paris. ..."
model.generate_text(messages=[{"role": "user", "content": "What is the capital of France?"}])
for piece in model.generate_text(messages=conversation, stream=True):            # pieces as they are decoded
    print(piece, end="", flush=True)
```

A prompt is tokenized as the model's own library tokenizes it (an "hf" tokenizer's post-processor adds BOS where
the model wants one); a conversation is rendered with the model's chat template, with the assistant's turn opened
(`add_generation_prompt`), and tokenized as it stands, special tokens included. Decoding uses the KV-cache decoder
and ends a row at any of the model's EOS tokens or at a `stop` string.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from mmfm.config import DEFAULT_BATCH_SIZE
from mmfm.decoding import CachedDecoder, RecomputingDecoder
from mmfm.errors import InputError
from mmfm.pipelines import batches, text_items
from mmfm.sequence import TokenSequence
from mmfm.text_generation import GenerationConfig, Sampler, generate

# A `mmfm.model.MultimodalModel`, annotated `nn.Module` as in `mmfm.pipelines` (the model forwards here).
MultimodalModel = nn.Module


class Started(NamedTuple):
    """A decoder primed with prompts (`start`): what the generation loops continue."""

    state: Any
    config: GenerationConfig
    prompt: Tensor


def generate_text(
    model: MultimodalModel,
    prompts: str | Sequence[str] | None = None,
    *,
    messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]] | None = None,
    stream: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    **generation: Any,
) -> str | list[str] | Iterator[str]:
    """Continues prompts, or answers conversations, with the model's language model.

    Args:
        model: the model; it needs a caption head (its LM head).
        prompts: one text (returns one str) or a list of texts (returns a list).
        messages: instead of prompts, one conversation (a list of {"role", "content"} turns; returns one str) or
            a list of conversations (returns a list). The model's chat template renders them.
        stream: return an iterator of text pieces as they are decoded (one prompt or conversation only);
            pieces never split a character.
        batch_size: prompts generated at once (left-padded to the longest).
        progress: a progress bar over the batches.
        **generation: `GenerationConfig` fields: max_new_tokens (default `caption.max_new_tokens`), do_sample,
            temperature, top_k, top_p, repetition_penalty, stop, seed, num_beams, length_penalty, use_cache.

    Returns:
        The generated text without the prompt: one str, a list, or an iterator of pieces (`stream=True`).

    Raises:
        InputError: neither or both of prompts and messages; a conversation the template refuses; a prompt that
            leaves no room to generate within `backbone.max_seq_len` (a shorter `max_new_tokens` is used when the
            prompt leaves less room than asked for, never a truncated prompt).
    """
    model.head("caption")
    config = GenerationConfig.from_options(generation, max_new_tokens=model.config.caption.max_new_tokens)
    if (prompts is None) == (messages is None):
        raise InputError("generate_text takes prompts or messages= (a conversation), one of them")
    if messages is not None:
        single = is_conversation(messages)
        conversations = [messages] if single else conversation_list(messages)
        rows = [
            conversation_ids(model, c, f"messages[{i}]" if not single else "messages")
            for i, c in enumerate(conversations)
        ]
    else:
        single = isinstance(prompts, str)
        rows = [prompt_ids(model, p) for p in text_items(prompts)]
    return respond(model, rows, _start, config, stream=stream, batch_size=batch_size, progress=progress, single=single)


def respond(
    model: MultimodalModel,
    prompts: list,
    begin: Callable[[MultimodalModel, list, GenerationConfig], Started],
    config: GenerationConfig,
    *,
    stream: bool,
    batch_size: int,
    progress: bool,
    single: bool,
) -> str | list[str] | Iterator[str]:
    """The texts generated for prompts (any form `begin(model, prompts, config)` primes a decoder from),
    `batch_size` at a time, or the one prompt's text as a stream of pieces; one str when `single`.

    Raises:
        InputError: `stream=True` with several prompts, or with beam search.
    """
    if stream:
        if len(prompts) != 1:
            raise InputError(f"stream=True generates one text at a time, got {len(prompts)} prompts")
        if config.num_beams > 1:
            raise InputError("stream=True decodes token by token; beam search (num_beams > 1) cannot stream")
        return stream_text(model, begin(model, prompts, config))
    texts = []
    for batch in batches(len(prompts), batch_size, progress, "generate"):
        texts += generate_batch(model, begin(model, prompts[batch], config))
    return texts[0] if single else texts


def prompt_ids(model: MultimodalModel, prompt: str) -> list[int]:
    """A prompt's ids as the model's tokenizer frames a prompt (BOS where the model wants one, no EOS)."""
    tok = model.tokenizer
    if hasattr(tok, "encode_prompt"):
        return tok.encode_prompt(prompt)
    return [tok.bos_id, *tok.encode(prompt)]


def conversation_ids(
    model: MultimodalModel, messages: Sequence[Mapping[str, Any]], what: str = "messages"
) -> list[int]:
    """A conversation's ids: rendered by the model's chat template with the assistant's turn opened."""
    from mmfm.chat_format import render_conversation

    text = model.config.text
    if text.chat_template is None:
        raise InputError(
            f"{what}: this model has no chat template (text.chat_template); pass prompts instead, or set one"
        )
    return model.tokenizer.encode(render_conversation(text, messages, generation_prompt=True))


def is_conversation(messages: object) -> bool:
    return (
        isinstance(messages, Sequence)
        and not isinstance(messages, str)
        and all(isinstance(m, Mapping) for m in messages)
    )


def conversation_list(messages: object) -> list[Sequence[Mapping[str, Any]]]:
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InputError(
            f"messages= must be a conversation (a list of {{'role', 'content'}} dicts) or a list of them, got "
            f"{type(messages).__name__}"
        )
    for i, conversation in enumerate(messages):
        if not is_conversation(conversation):
            raise InputError(f"messages[{i}] must be a conversation: a list of {{'role', 'content'}} dicts")
    return list(messages)


def check_prompt_lengths(model: MultimodalModel, lengths: Sequence[int], what: str = "prompt") -> None:
    """Refuses an empty prompt, or one that leaves no room to generate within `backbone.max_seq_len`."""
    limit = model.config.backbone.max_seq_len
    for i, length in enumerate(lengths):
        if length >= limit:
            raise InputError(
                f"{what} {i} has {length} tokens; the model reads at most backbone.max_seq_len = {limit}, and "
                f"generating needs at least one more: shorten the {what}"
            )
        if not length:
            raise InputError(f"{what} {i} is empty after tokenization; a model needs at least one token to continue")


def _start(model: MultimodalModel, rows: list[list[int]], config: GenerationConfig) -> Started:
    """Generation from left-padded prompt ids."""
    check_prompt_lengths(model, [len(row) for row in rows])
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), model.tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, length - len(row) :] = True
    ids, mask = ids.to(model.device), mask.to(model.device)
    return start(model, model.sequence(ids=ids, mask=mask), ids.masked_fill(~mask, -1), config)


def start(model: MultimodalModel, seq: TokenSequence, prompt: Tensor, config: GenerationConfig) -> Started:
    """The decoder primed with a left-padded prompt sequence, and the config with `max_new_tokens` cut to the room
    the sequence leaves.

    Args:
        model: the model.
        seq: the prompts' token sequence, left-padded.
        prompt: (B, L) the prompt's token ids, -1 on padding and media (what the repetition penalty counts).
        config: the generation options.
    """
    room = min(config.max_new_tokens, model.config.backbone.max_seq_len - seq.mask.shape[1])
    config = replace(config, max_new_tokens=room)
    parts = model.decoder_parts()
    state = CachedDecoder(parts, seq, room) if config.use_cache else RecomputingDecoder(parts, seq)
    return Started(state, config, prompt)


def _eos_ids(model: MultimodalModel) -> list[int]:
    tok = model.tokenizer
    return list(getattr(tok, "eos_ids", [tok.eos_id]))


def _suppressed(model: MultimodalModel) -> list[int]:
    """Tokens never generated: none for a language model's own tokenizer; BOS and PAD for mmfm's."""
    tok = model.tokenizer
    if hasattr(tok, "encode_prompt"):
        return []
    return [tok.bos_id] if tok.pad_is_token else [tok.bos_id, tok.pad_id]


@torch.no_grad()
def generate_token_ids(model: MultimodalModel, prompts: Sequence[Sequence[int]], **generation: Any) -> list[list[int]]:
    """The generated ids of every prompt given as ids (what `generate_text` decodes), each cut before its EOS.

    Args:
        model: the model; it needs a caption head.
        prompts: token ids of each prompt (`prompt_ids`, `conversation_ids`), generated together, left-padded.
        **generation: `GenerationConfig` fields; `stop` strings need text and are `generate_text`'s.
    """
    model.head("caption")
    config = GenerationConfig.from_options(generation, max_new_tokens=model.config.caption.max_new_tokens)
    if config.stop:
        raise InputError("stop strings end texts, not ids: use generate_text")
    return _token_ids(model, _start(model, [list(p) for p in prompts], config))


def _token_ids(model: MultimodalModel, started: Started) -> list[list[int]]:
    state, config, prompt = started
    return generate(state, config, _eos_ids(model), _suppressed(model), prompt)


@torch.no_grad()
def generate_batch(model: MultimodalModel, started: Started) -> list[str]:
    """The texts generated from a primed decoder (`start`), each cut at its first EOS or stop string."""
    return [reply.text for reply in generate_replies(model, started)]


class Reply(NamedTuple):
    """One row's generated text, why it ended and how many tokens it took.

    Attributes:
        text: the text, cut at its first EOS or stop string.
        finish: "stop" (an EOS or a stop string ended it) or "length" (its token limit did: `max_new_tokens`, or
            the room `backbone.max_seq_len` left).
        tokens: the tokens generated for it, the one that ended it (an EOS, the end of a stop string) included.
    """

    text: str
    finish: str
    tokens: int


@torch.no_grad()
def generate_replies(model: MultimodalModel, started: Started) -> list[Reply]:
    """`generate_batch`'s texts, each with why it ended and how many tokens it took."""
    config = started.config
    if not config.stop:
        limit = config.max_new_tokens
        return [
            Reply(_text(model.tokenizer, row), "length" if len(row) >= limit else "stop", min(len(row) + 1, limit))
            for row in _token_ids(model, started)  # each cut before its EOS
        ]
    texts, ends = [""] * len(started.prompt), [("", 0)] * len(started.prompt)
    for count, step in enumerate(stream_rows(model, started), 1):
        for row, piece, finish in step:
            texts[row] += piece
            if finish:
                ends[row] = (finish, count)
    return [Reply(text, *end) for text, end in zip(texts, ends)]


@torch.no_grad()
def stream_text(model: MultimodalModel, started: Started) -> Iterator[str]:
    """The text generated from a primed decoder of one row (`start`), in pieces as they are decoded."""
    for step in stream_rows(model, started):
        for _, piece, _ in step:
            if piece:
                yield piece


@torch.no_grad()
def stream_rows(
    model: MultimodalModel,
    started: Started,
    stops: Sequence[Sequence[str]] | None = None,
    limits: Sequence[int] | None = None,
    dropped: Callable[[int], bool] | None = None,
) -> Iterator[list[tuple[int, str, str | None]]]:
    """Every row's text from a primed decoder (`start`), step by step: what a batch of streams reads.

    Each decoding step yields `(row, piece, finish)` for every row still going: the text that became final at this
    step ("" when none did; pieces never split a character) and, at the row's last step, why it ended: "stop" (an
    EOS or a stop string) or "length" (its token limit), else None. A row is never named again after it ends;
    iteration stops when every row has ended. Every row starts at the first step, so a row that ends at the n-th
    step has generated n tokens.

    Args:
        model: the model.
        started: the primed decoder; its config decides how tokens are chosen.
        stops: each row's stop strings (default: the config's `stop` for every row).
        limits: each row's most new tokens (default, and at most: the config's `max_new_tokens`).
        dropped: asked of each going row at each step, before its token is read: True ends the row there, unnamed
            (nobody reads it any more), so that it no longer keeps the batch decoding.
    """
    state, config, prompt = started
    rows = len(prompt)
    eos = _eos_ids(model)
    sampler = Sampler(state, config, eos, _suppressed(model), prompt)
    texts = [_StoppingText(model.tokenizer, config.stop if stops is None else stops[i]) for i in range(rows)]
    # at most config.max_new_tokens, the sampler's own limit: every row ends by the sampler's last step
    limits = [config.max_new_tokens] * rows if limits is None else [min(n, config.max_new_tokens) for n in limits]
    going = [True] * rows
    for count, tokens in enumerate(sampler, 1):
        step = []
        for i, token in enumerate(tokens.tolist()):
            if not going[i]:
                continue
            if dropped is not None and dropped(i):
                going[i], sampler.ended[i] = False, True
                continue
            stopped = texts[i].push(token, token in eos)
            finish = "stop" if stopped else "length" if count >= limits[i] else None
            if finish:
                going[i] = False
                sampler.ended[i] = True  # a stop string or its limit: the row ends here
            step.append((i, texts[i].finish() if finish else texts[i].take(), finish))
        yield step


def _text(tokenizer: Any, ids: list[int]) -> str:
    """The text of generated ids; ids past the tokenizer's vocabulary (rows a model pads its embedding with, which
    no text maps to) have none."""
    return tokenizer.decode([i for i in ids if i < tokenizer.vocab_size])


class _StoppingText:
    """One row's text as tokens arrive: decoded incrementally, cut at the first stop string.

    Text that could still be the start of a stop string is held back, so nothing past a stop is ever given out.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]):
        from mmfm.encoders.hf_tokenizer import TextStream

        self.stream = TextStream(tokenizer)
        self.stops = tuple(stops)
        self.ready, self.held, self.done = "", "", False

    def push(self, token: int, is_eos: bool) -> bool:
        """Adds one token (an EOS ends the text and is not decoded); True when the text has ended."""
        if self.done:
            return True
        if is_eos:
            self.done = True
            self._add(self.stream.flush(), final=True)
            return True
        if token < self.stream.tokenizer.vocab_size:  # a padding row of the embedding has no text (see `_text`)
            self._add(self.stream.push(token))
        return self.done

    def take(self) -> str:
        """The text that became final since the last call."""
        out, self.ready = self.ready, ""
        return out

    def finish(self) -> str:
        """Everything not yet taken, the row having ended (max_new_tokens reached or an EOS)."""
        if not self.done:
            self.done = True
            self._add(self.stream.flush(), final=True)
        return self.take()

    def _add(self, piece: str, final: bool = False) -> None:
        held = self.held + piece
        cuts = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.ready += held[: min(cuts)]
            self.held, self.done = "", True
            return
        keep = 0 if final else max((n for s in self.stops for n in range(1, len(s)) if held.endswith(s[:n])), default=0)
        self.ready += held[: len(held) - keep]
        self.held = held[len(held) - keep :]
