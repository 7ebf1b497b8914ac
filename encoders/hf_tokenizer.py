"""Hugging Face tokenizers (a tokenizer.json, or the vocabulary a GGUF file carries) behind mmfm's `Tokenizer`.

The tokenizer itself is the `tokenizers` library's: byte-level BPE (GPT-2, Llama 3, SmolLM, Qwen), SentencePiece-style
BPE with byte fallback (Llama 2, TinyLlama, Mistral) and whatever else a tokenizer.json describes. mmfm adds the
special tokens the model defines (BOS, EOS, PAD, more stop tokens), its framing and decoding conventions, a GGUF
reader that builds the same tokenizer as transformers does, and `TextStream`, which decodes ids as they are generated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from mmfm.config import quote, read_small_file, shorten
from mmfm.encoders.tokenizer_base import Tokenizer, check_unicode
from mmfm.errors import ConfigError, InputError

if TYPE_CHECKING:
    pass

# The most bytes a tokenizer.json may have (Llama 3's has 9 MB, Gemma 3's 33 MB); assign
# `mmfm.encoders.hf_tokenizer.MAX_TOKENIZER_BYTES` to change it.
MAX_TOKENIZER_BYTES = 64 * 2**20

GGUF_TOKENIZER_MODELS = ("gpt2", "llama")  # the `tokenizer.ggml.model` values `HFTokenizer.from_gguf` reads

# llama.cpp's token types (`tokenizer.ggml.token_type`): control tokens are special (`<|im_end|>`, `<s>`);
# user-defined ones (`<think>`) are matched whole in text but decoded like any other.
_CONTROL, _USER_DEFINED = 3, 4

# How a byte-level BPE vocabulary splits text before its merges, by `tokenizer.ggml.pre`: the split regex of the
# tokenizer the vocabulary was trained with. The names transformers' GGUF loader knows; any other name gets GPT-2's
# split (the `ByteLevel` pre-tokenizer's own regex), as there.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with the special tokens its model defines, framed and decoded as mmfm's tokenizers are.

    `encode` adds no special ids but recognises the special and added tokens written in the text (`<|im_end|>`), as
    transformers does; `encode_prompt` adds what the tokenizer's post-processor adds (Llama's BOS), which is
    transformers' `tokenizer(text)["input_ids"]`. `decode` skips special tokens. Truncation and padding settings
    stored in a tokenizer.json are switched off: mmfm truncates and pads itself.

    Args:
        backend: the tokenizer; kept (and changed by `add_special_tokens`), not copied.
        bos_token: the token that starts a text; None when the model has none, and then BOS is the EOS token.
        eos_token: the token that ends a text.
        pad_token: the token that fills padding; None pads with the EOS token.
        stop_tokens: more tokens that end generation (Llama 3's `<|eot_id|>`, ChatML's `<|im_end|>`).

    Attributes:
        eos_ids: the ids that end generation: EOS, then the stop tokens'.

    Raises:
        ConfigError: a named token is not in the vocabulary, or `eos_token` is None.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        stop_tokens: Sequence[str] = (),
    ) -> None:
        if eos_token is None:
            raise ConfigError("a Hugging Face tokenizer needs text.eos_token, the token that ends a text")
        named = {"text.bos_token": bos_token, "text.eos_token": eos_token, "text.pad_token": pad_token}
        named.update({f"text.stop_tokens[{i}]": token for i, token in enumerate(stop_tokens)})
        missing = [
            f"{key} {quote(token)}"
            for key, token in named.items()
            if token is not None and backend.token_to_id(token) is None
        ]
        if missing:
            raise ConfigError(f"not in the tokenizer's vocabulary: {', '.join(missing)}")
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.stop_tokens = list(stop_tokens)
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self.eos_id = backend.token_to_id(eos_token)
        self.bos_id = self.eos_id if bos_token is None else backend.token_to_id(bos_token)
        self.pad_id = self.eos_id if pad_token is None else backend.token_to_id(pad_token)
        special = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
        self.pad_is_token = self.pad_id not in special
        self.eos_ids = list(dict.fromkeys([self.eos_id, *(backend.token_to_id(t) for t in stop_tokens)]))

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        stop_tokens: Sequence[str] = (),
    ) -> HFTokenizer:
        """The tokenizer a tokenizer.json file describes, with the special tokens its model uses.

        Only a regular file of at most `MAX_TOKENIZER_BYTES` is read (see `mmfm.config.read_small_file`).

        Args:
            path: the tokenizer.json, as transformers and `save_vocabulary` write it.
            bos_token: see `HFTokenizer`; the tokens are named here because tokenizer.json does not name them
                (transformers keeps them in tokenizer_config.json).
            eos_token: see `HFTokenizer`.
            pad_token: see `HFTokenizer`.
            stop_tokens: see `HFTokenizer`.

        Raises:
            ConfigError: naming the file, when it is missing, not a regular file, too large, not UTF-8 JSON, not a
                tokenizer the `tokenizers` library reads, or lacks a named token.
        """
        name = shorten(str(path))
        text = read_small_file(
            path, "tokenizer file", MAX_TOKENIZER_BYTES, "mmfm.encoders.hf_tokenizer.MAX_TOKENIZER_BYTES"
        )
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the tokenizers library raises plain Exception on a malformed tokenizer
            # parsed again only to say what is wrong: not JSON, not a tokenizer, or a tokenizer it cannot read
            try:
                data = json.loads(text)
            except json.JSONDecodeError as bad:
                raise ConfigError(f"{name}: the tokenizer file is not JSON ({bad})") from None
            if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
                raise ConfigError(f'{name}: not a Hugging Face tokenizer.json (it has no "model" object)') from None
            raise ConfigError(f"{name}: the tokenizers library cannot read this tokenizer.json ({e})") from None
        try:
            return cls(backend, bos_token, eos_token, pad_token, stop_tokens)
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any]) -> HFTokenizer:
        """The tokenizer a GGUF file's metadata describes: the same ids as transformers' tokenizer for that file.

        `tokenizer.ggml.model` "gpt2" is byte-level BPE (tokens, merges, and `tokenizer.ggml.pre` naming how text is
        split before merging); "llama" is SentencePiece-style BPE with byte fallback (tokens and scores; the merges
        are derived from the scores when the file lists none). Control tokens become special tokens, user-defined
        ones added tokens. BOS, EOS, PAD come from `tokenizer.ggml.{bos,eos,padding}_token_id`, `eot_token_id` and
        `eom_token_id` become stop tokens, and `encode_prompt` adds BOS and EOS as `add_bos_token` and
        `add_eos_token` say (BOS by default for "llama", as llama.cpp does).

        Args:
            metadata: the file's metadata, e.g. `mmfm.convert.gguf.gguf_metadata(gguf.GGUFReader(path))`.

        Raises:
            ConfigError: the tokenizer model is not one of `GGUF_TOKENIZER_MODELS`, or the metadata lacks or
                mistypes a key it needs.
        """
        kind = metadata.get("tokenizer.ggml.model")
        if kind not in GGUF_TOKENIZER_MODELS:
            raise ConfigError(
                f"GGUF tokenizer.ggml.model {quote(kind)} is not supported; supported: "
                + ", ".join(GGUF_TOKENIZER_MODELS)
            )
        written = _gguf_list(metadata, "tokenizer.ggml.tokens", str)
        if not written:
            raise ConfigError("GGUF metadata has no tokenizer.ggml.tokens")
        types = _gguf_list(metadata, "tokenizer.ggml.token_type", int, len(written)) or [0] * len(written)
        merges = _gguf_list(metadata, "tokenizer.ggml.merges", str)
        if merges is None:
            scores = _gguf_list(metadata, "tokenizer.ggml.scores", (int, float), len(written))
            if scores is None:
                raise ConfigError("GGUF metadata has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
            merges = _merges_from_scores(written, scores)
        else:
            merges = [tuple(merge.split(" ", 1)) for merge in merges]

        if kind == "gpt2":
            backend, tokens = _byte_level_bpe(written, merges, metadata.get("tokenizer.ggml.pre"))
        else:
            backend, tokens = _sentencepiece_bpe(written, merges), written

        def named(key: str) -> str | None:
            i = metadata.get(f"tokenizer.ggml.{key}")
            if i is None:
                return None
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(tokens):
                raise ConfigError(f"GGUF tokenizer.ggml.{key} must be a token id in [0, {len(tokens)}), got {quote(i)}")
            return tokens[i]

        bos, eos, pad, unk = (named(f"{t}_token_id") for t in ("bos", "eos", "padding", "unknown"))
        if eos is None:
            raise ConfigError("GGUF metadata has no tokenizer.ggml.eos_token_id, so where a text ends is unknown")
        # Control tokens are special, user-defined ones added tokens. One whose spelling the byte alphabet had to
        # change is left an ordinary token: it no longer matches the text it was written as (transformers skips it
        # too). The tokens BOS, EOS, PAD and UNK name are special whatever their type, as transformers makes them.
        kept = [(token, token_type) for token, token_type, w in zip(tokens, types, written) if token == w]
        specials = [token for token, token_type in kept if token_type == _CONTROL]
        specials += [token for token in (bos, eos, pad, unk) if token is not None]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        backend.add_tokens([AddedToken(t, normalized=False) for t, token_type in kept if token_type == _USER_DEFINED])

        single, added = ["$A:0"], []
        if bos is not None and metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"):
            single.insert(0, f"{bos}:0")
            added.append((bos, backend.token_to_id(bos)))
        if metadata.get("tokenizer.ggml.add_eos_token", False):
            single.append(f"{eos}:0")
            added.append((eos, backend.token_to_id(eos)))
        backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=added)
        stops = [t for t in (named("eot_token_id"), named("eom_token_id")) if t is not None and t != eos]
        return cls(backend, bos_token=bos, eos_token=eos, pad_token=pad, stop_tokens=stops)

    # When `encode` truncates, it tokenizes a prefix of the text long enough for this many ids beyond those kept: a
    # cut changes only the ids next to it (those of the word it cuts), so the kept ids are the whole text's.
    _cut_margin = 16

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """The ids of `text`, special tokens written in it included, without BOS or EOS (see `Tokenizer.encode`).

        With `max_tokens`, growing prefixes of the text are tokenized (4 characters per kept id, then doubling)
        until one gives enough ids, so the work is bounded by what is kept, not by the length of `text`.
        """
        check_unicode(text, "text")
        if max_tokens is None:
            return self.backend.encode(text, add_special_tokens=False).ids
        end = 4 * (max_tokens + self._cut_margin)
        while True:
            ids = self.backend.encode(text[:end], add_special_tokens=False).ids
            if end >= len(text) or len(ids) >= max_tokens + self._cut_margin:
                return ids[:max_tokens]
            end *= 2

    def encode_prompt(self, text: str) -> list[int]:
        """The ids of `text` with what the tokenizer's post-processor adds (BOS for Llama), as transformers'
        `tokenizer(text)["input_ids"]` gives them: how a prompt starts a generation.

        Raises:
            InputError: `text` holds a lone surrogate (not Unicode text).
        """
        check_unicode(text, "text")
        return self.backend.encode(text).ids

    def _decode_tokens(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of `token` (an ordinary, added or special token), or None when it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Makes `tokens` special tokens (matched whole in text, skipped by `decode`) and returns their ids.

        A token already in the vocabulary keeps its id (and becomes special); a new one gets the next free id, so
        `vocab_size` grows by the number of new tokens, and the embedding must grow with it.

        Args:
            tokens: the tokens, e.g. `["<image>", "<audio>"]`.

        Returns:
            Their ids, in order.

        Raises:
            InputError: a token is not a non-empty str.
        """
        for i, token in enumerate(tokens):
            if not isinstance(token, str) or not token:
                raise InputError(f"tokens[{i}] must be a non-empty str, got {quote(token)}")
            check_unicode(token, f"tokens[{i}]")
        self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        ids = [self.backend.token_to_id(t) for t in tokens]
        self.vocab_size = max(self.vocab_size, *(i + 1 for i in ids))
        return ids

    def save_vocabulary(self, path: str | Path) -> None:
        """Writes the tokenizer as a tokenizer.json file, which `from_file` (and transformers) read back as it is.

        BOS, EOS, PAD and the stop tokens are not part of the file; they are saved in the model's config.
        """
        self.backend.save(str(path))


def _gguf_list(
    metadata: dict[str, Any], key: str, kind: type | tuple[type, ...], length: int | None = None
) -> list | None:
    """`metadata[key]` checked to be a list of `kind` values (`length` of them, when given), or None when absent.

    Raises:
        ConfigError: naming the key, when the value is not such a list.
    """
    values = metadata.get(key)
    if values is None:
        return None
    if not isinstance(values, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
        raise ConfigError(f"GGUF {key} must be a list of {names}, got {quote(values)}")
    if length is not None and len(values) != length:
        raise ConfigError(f"GGUF {key} has {len(values)} items but tokenizer.ggml.tokens has {length}")
    return values


def _byte_level_bpe(
    written: list[str], merges: list[tuple[str, str]], pre: str | None
) -> tuple[tokenizers.Tokenizer, list[str]]:
    """GPT-2-style byte-level BPE over a GGUF vocabulary, and the tokens as its vocabulary spells them.

    Byte-level vocabularies spell each byte as one printable character; a token written otherwise (a control token
    with a space, say) is respelled that way, as transformers does.
    """
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokens = [t if set(t) <= alphabet else spell.pre_tokenize_str(t)[0][0] for t in written]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = tokenizers.Tokenizer(BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix=""))
    split = _GGUF_SPLITS.get(pre)
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend, tokens


def _sentencepiece_bpe(tokens: list[str], merges: list[tuple[str, str]]) -> tokenizers.Tokenizer:
    """SentencePiece-style BPE as Llama's tokenizer has it: spaces written as U+2581 and one prepended to the text,
    characters outside the vocabulary as byte tokens (`<0x0A>`)."""
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = tokenizers.Tokenizer(BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: each way of writing a token as two vocabulary tokens.

    They are ordered as transformers' GGUF loader orders them (`generate_merges`), so the pieces are the same: by
    the merged token's score, then the length of the left part, then of the right part, all descending; ties keep
    vocabulary order. (A repeated token keeps its first place and its last score, as there.)
    """
    vocab = set(tokens)
    candidates = [
        (-score, -k, k - len(token), token[:k], token[k:])
        for token, score in dict(zip(tokens, scores)).items()
        for k in range(1, len(token))
        if token[:k] in vocab and token[k:] in vocab
    ]
    candidates.sort(key=lambda c: c[:3])
    return [(left, right) for *_, left, right in candidates]


class TextStream:
    """The text of generated ids as they arrive: each piece is final, and the pieces join to `tokenizer.decode(ids)`.

    Decoding each id alone goes wrong twice: a character can span several ids (byte-level BPE pieces, byte-fallback
    tokens), and decoders treat a text's first token apart (SentencePiece drops the space that starts a text). So
    each push decodes a short window, the ids of the last piece returned plus those not yet returned, and returns what
    the window's text adds to that piece's text: nothing while it ends in an incomplete character (U+FFFD). The
    window stays a few ids long, so streaming n ids costs O(n) (bytes that are not UTF-8 at all are held, and the
    window grows, until a valid character follows them or `flush`).

    Args:
        tokenizer: any mmfm tokenizer.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._start = 0  # the window's first id: the first id of the last piece returned
        self._read = 0  # the first id whose text has not been returned

    def push(self, token_id: int) -> str:
        """Adds one generated id.

        Returns:
            The text that became final: "" while a character is still incomplete (or the id adds no text, like a
            special token).

        Raises:
            InputError: `token_id` is not an id of the tokenizer.
        """
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text not yet returned, at the end of generation (an incomplete character decodes to U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        done = self.tokenizer.decode(self.ids[self._start : self._read])
        text = self.tokenizer.decode(self.ids[self._start :])
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self._start, self._read = self._read, len(self.ids)
        return text[len(done) :]
