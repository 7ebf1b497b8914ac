"""Text generation loops: greedy, temperature / top-k / top-p sampling, and beam search.

The loops only see a `DecoderState`: the next-token logits of every row, a way to feed one token per row,
and a way to reorder rows. Whether that state keeps a KV cache or recomputes the whole sequence each step
is its own business, which is what lets tests check cached against uncached decoding.
"""

from __future__ import annotations

import difflib
import math
import numbers
import reprlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from mmfm.errors import InputError


class DecoderState(Protocol):
    logits: Tensor  # (B, vocab) logits of the next token of every row

    def advance(self, tokens: Tensor) -> None:
        """Appends one (B,) token per row and updates `logits`."""

    def reorder(self, index: Tensor) -> None:
        """Keeps rows `index`, in that order (the batch may grow, as when beams are laid out)."""


@dataclass
class GenerationConfig:
    """How tokens are chosen.

    Attributes:
        max_new_tokens: most tokens generated per row (EOS ends a row earlier).
        num_beams: beams per row; above 1 means beam search (deterministic, no sampling).
        do_sample: sample from the (filtered) distribution instead of taking the argmax.
        temperature: logits are divided by this before sampling.
        top_k: sample among the k most likely tokens only; 0 disables.
        top_p: sample among the smallest set of tokens whose probability reaches p; 1.0 disables.
        length_penalty: beam hypotheses are ranked by sum log-prob / length ** length_penalty.
        repetition_penalty: logits of tokens already in the prompt or the output are divided by this where
            positive and multiplied where negative (CTRL's penalty, as transformers applies it); 1.0 disables.
        stop: strings that end a text where they appear (the text is cut before them).
        seed: seeds a private generator, so sampling is reproducible and leaves the global RNG alone.
        use_cache: decode incrementally with a KV cache (False recomputes the sequence every step).
    """

    max_new_tokens: int = 32
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        # Each value is checked by name and stored as a plain Python value (numpy scalars are accepted), so a
        # careless value is an InputError here rather than a TypeError or NaN probabilities mid-generation.
        self.max_new_tokens = whole_number("max_new_tokens", self.max_new_tokens, 1)
        self.num_beams = whole_number("num_beams", self.num_beams, 1)
        self.do_sample = _flag("do_sample", self.do_sample)
        self.use_cache = _flag("use_cache", self.use_cache)
        if self.num_beams > 1 and self.do_sample:
            raise InputError("beam search (num_beams > 1) does not sample; set do_sample=False")
        self.temperature = finite_number("temperature", self.temperature, above=0.0)
        self.top_k = whole_number("top_k", self.top_k, 0)
        self.top_p = finite_number("top_p", self.top_p, above=0.0, high=1.0)
        self.length_penalty = finite_number("length_penalty", self.length_penalty)
        self.repetition_penalty = finite_number("repetition_penalty", self.repetition_penalty, above=0.0)
        self.stop = _strings("stop", self.stop)
        self.seed = check_seed("seed", self.seed)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], **defaults: Any) -> GenerationConfig:
        """A config from user keyword options over `defaults`; an unknown option is an InputError naming it."""
        known = [f.name for f in fields(cls)]
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise InputError(f"unknown generation option {name!r}{hint}; known: {', '.join(known)}")
        return cls(**{**defaults, **options})


# ---- argument checks shared by the generation APIs ----

# What torch.Generator.manual_seed accepts: any 64-bit pattern, signed or unsigned.
SEED_RANGE = (-(2**63), 2**64 - 1)


def whole_number(name: str, value: object, low: int, high: int | None = None) -> int:
    """`value` as an int (numpy integers included, bools and floats refused) in [low, high]; else InputError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be a whole number, got {_shown(value)}")
    value = int(value)
    if value < low or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InputError(f"{name} must be a whole number {span}, got {value}")
    return value


def finite_number(name: str, value: object, above: float | None = None, high: float | None = None) -> float:
    """`value` as a finite float (ints and numpy numbers included) > above and <= high; else InputError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {_shown(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    if (above is not None and value <= above) or (high is not None and value > high):
        bounds = [f"> {above}"] * (above is not None) + [f"<= {high}"] * (high is not None)
        raise InputError(f"{name} must be {' and '.join(bounds)}, got {value}")
    return value


def check_seed(name: str, value: object) -> int | None:
    """A seed as an int (numpy integers included) in `SEED_RANGE`, or None; else InputError naming `name`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be a whole number, got {_shown(value)}")
    low, high = SEED_RANGE
    if not low <= int(value) <= high:
        raise InputError(f"{name} must be a whole number in [-2**63, 2**64 - 1] (64 bits), got {_shown(value)}")
    return int(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be True or False, got {_shown(value)}")
    return bool(value)


def _strings(name: str, value: object) -> tuple[str, ...]:
    """One non-empty string or a sequence of them, as a tuple; else InputError."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(v, str) and v for v in items):
        raise InputError(f"{name} must be a non-empty string or a list of them, got {_shown(value)}")
    return tuple(items)


def _shown(value: object) -> str:
    """A value for an error message, bounded in length (a huge int or a long list is not printed whole)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value).bit_length() > 128:
        return f"an integer of {int(value).bit_length()} bits"
    text = reprlib.repr(value)
    return f"{text} ({type(value).__name__})" if isinstance(value, str) else text


def generate(
    state: DecoderState,
    config: GenerationConfig,
    eos_ids: int | Sequence[int],
    suppress_ids: Sequence[int] = (),
    prompt_ids: Tensor | None = None,
) -> list[list[int]]:
    """Generates token ids for every row of `state`; each list stops before its EOS.

    Args:
        state: the decoder, primed with the prompt.
        config: how tokens are chosen (`stop` strings are the caller's: they need a tokenizer).
        eos_ids: the token, or tokens, that end a row (not returned).
        suppress_ids: tokens never generated, such as BOS and padding.
        prompt_ids: (B, T) the prompt's ids, for `repetition_penalty` (padding may be given as -1).
    """
    eos = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    if config.num_beams > 1:
        suppress = torch.tensor(list(suppress_ids), dtype=torch.long, device=state.logits.device)
        return _beam_search(state, config, eos[0], suppress)
    steps = Sampler(state, config, eos, suppress_ids, prompt_ids)
    out = torch.stack(list(steps), dim=1).tolist()  # (B, T)
    return [_until(row, eos) for row in out]


def _until(row: list[int], eos: list[int]) -> list[int]:
    ends = [i for i, token in enumerate(row) if token in eos]
    return row[: ends[0]] if ends else row


class Sampler:
    """Greedy or sampled decoding, one step at a time: iterating yields each step's (B,) tokens.

    A row that has ended (on an EOS, or because the caller set `ended[row]`, at a stop string say) yields its
    first EOS id from then on; iteration stops when every row has ended or after `max_new_tokens` steps.

    Args:
        state: the decoder, primed with the prompt.
        config: how tokens are chosen.
        eos_ids: the tokens that end a row.
        suppress_ids: tokens never generated.
        prompt_ids: (B, T) the prompt's ids for `repetition_penalty`; negative ids (padding) are ignored.
    """

    def __init__(
        self,
        state: DecoderState,
        config: GenerationConfig,
        eos_ids: Sequence[int],
        suppress_ids: Sequence[int] = (),
        prompt_ids: Tensor | None = None,
    ):
        self.state, self.config = state, config
        batch, vocab = state.logits.shape
        device = state.logits.device
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
        self.suppress = torch.tensor(list(suppress_ids), dtype=torch.long, device=device)
        self.ended = torch.zeros(batch, dtype=torch.bool, device=device)
        self.seen = None  # (B, vocab) tokens the repetition penalty applies to
        if config.repetition_penalty != 1.0:
            self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
            if prompt_ids is not None:
                ids = prompt_ids.to(device)
                self.seen.scatter_(1, ids.clamp(min=0), ids >= 0)
        self.generator = None
        if config.do_sample:
            self.generator = torch.Generator(device=device)
            if config.seed is not None:
                self.generator.manual_seed(config.seed)
            else:
                self.generator.seed()

    def __iter__(self) -> Iterator[Tensor]:
        config, state = self.config, self.state
        for step in range(config.max_new_tokens):
            if step:
                state.advance(self._last)
            logits = _next_logits(state, self.suppress)
            if self.seen is not None:
                penalised = torch.where(
                    logits > 0, logits / config.repetition_penalty, logits * config.repetition_penalty
                )
                logits = torch.where(self.seen, penalised, logits)
            if config.do_sample:
                probs = filter_logits(logits / config.temperature, config.top_k, config.top_p).softmax(-1)
                tokens = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
            else:
                tokens = logits.argmax(dim=-1)
            tokens = tokens.masked_fill(self.ended, int(self.eos[0]))  # (B,)
            if self.seen is not None:
                self.seen.scatter_(1, tokens[:, None], True)
            self.ended |= torch.isin(tokens, self.eos)
            self._last = tokens
            yield tokens
            if self.ended.all():
                return


def _next_logits(state: DecoderState, suppress: Tensor) -> Tensor:
    return state.logits.float().index_fill(-1, suppress, float("-inf")) if len(suppress) else state.logits.float()


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Sets to -inf every logit outside the top-k and outside the top-p nucleus (the most likely always stays)."""
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _beam_search(state: DecoderState, config: GenerationConfig, eos_id: int, suppress: Tensor) -> list[list[int]]:
    batch, vocab = state.logits.shape
    device, K = state.logits.device, config.num_beams
    state.reorder(torch.arange(batch, device=device).repeat_interleave(K))  # rows: (b0 beams, b1 beams, ...)
    scores = torch.full((batch, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # every beam starts identical: keep one alive so the first step does not pick duplicates
    beams: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(batch)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch

    def rank(score: float, length: int) -> float:
        return score / max(length, 1) ** config.length_penalty

    for step in range(config.max_new_tokens):
        logprobs = _next_logits(state, suppress).log_softmax(dim=-1).view(batch, K, vocab)
        candidates = (scores[:, :, None] + logprobs).view(batch, K * vocab)
        top_scores, top_ids = candidates.topk(2 * K, dim=-1)  # (B, 2K): enough to refill K beams past EOS hits
        next_rows, next_tokens, next_scores = [], [], []
        for b in range(batch):
            kept = []
            for score, flat in zip(top_scores[b].tolist(), top_ids[b].tolist()):
                beam, token = divmod(flat, vocab)
                if done[b]:
                    kept.append((0.0, 0, eos_id))  # placeholder rows keep the layout; they are never read
                elif token == eos_id:
                    finished[b].append((rank(score, len(beams[b][beam]) + 1), beams[b][beam]))
                else:
                    kept.append((score, beam, token))
                if len(kept) == K:
                    break
            if not done[b] and len(finished[b]) >= K:
                done[b] = True  # K hypotheses ended (Hugging Face's early_stopping=True)
            beams[b] = [beams[b][beam] + [token] for _, beam, token in kept]
            next_rows += [b * K + beam for _, beam, _ in kept]
            next_tokens += [token for _, _, token in kept]
            next_scores += [score for score, _, _ in kept]
        scores = torch.tensor(next_scores, device=device).view(batch, K)
        if all(done) or step == config.max_new_tokens - 1:
            break
        state.reorder(torch.tensor(next_rows, device=device))
        state.advance(torch.tensor(next_tokens, device=device))
    results = []
    for b in range(batch):
        hypotheses = finished[b]
        if not done[b]:
            hypotheses = hypotheses + [
                (rank(float(s), len(seq)), seq) for s, seq in zip(scores[b].tolist(), beams[b]) if seq
            ]
        results.append(max(hypotheses, key=lambda h: h[0])[1] if hypotheses else [])
    return results
