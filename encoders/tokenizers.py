"""Text to token ids and back: UTF-8 bytes, open_clip's CLIP BPE and BERT's WordPiece, and `build_tokenizer`, which
also builds a Hugging Face tokenizer.json tokenizer (`mmfm.encoders.hf_tokenizer`).

Every tokenizer implements one interface (`Tokenizer`, in `mmfm.encoders.tokenizer_base`): it frames a text as
`[BOS, tokens..., EOS]`, pads a batch to its longest item and returns a mask that is True on real tokens, so the
sequence builder and the heads never look at pad ids.
"""

from __future__ import annotations

import functools
import heapq
import json
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mmfm.config import TextConfig, read_small_file
from mmfm.encoders.hf_tokenizer import HFTokenizer
from mmfm.encoders.tokenizer_base import Tokenizer, check_unicode
from mmfm.errors import ConfigError

if TYPE_CHECKING:
    from open_clip.tokenizer import SimpleTokenizer

# The most bytes a "wordpiece" vocabulary file may have (BERT's vocab.txt has 0.2 MB, a multilingual tokenizer.json
# about 10 MB); assign `mmfm.encoders.tokenizers.MAX_VOCAB_BYTES` to change it.
MAX_VOCAB_BYTES = 64 * 2**20


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: 0 is PAD, 1 BOS, 2 EOS, and byte b is id b + 3 (259 ids). Needs no vocabulary file."""

    vocab_size = 259
    pad_id = 0
    bos_id = 1
    eos_id = 2
    _offset = 3

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        check_unicode(text, "text")
        if max_tokens is not None:
            text = text[:max_tokens]  # every character is at least one byte
        ids = [b + self._offset for b in text.encode("utf-8")]
        return ids if max_tokens is None else ids[:max_tokens]

    def _decode_tokens(self, ids: list[int]) -> str:
        # A model can emit byte sequences that are not valid UTF-8; they decode to U+FFFD, never raise.
        return bytes(i - self._offset for i in ids).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> SimpleTokenizer:
    # Imported here: importing open_clip takes seconds, and byte-tokenizer users never need it.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class ClipTokenizer(Tokenizer):
    """OpenAI CLIP's BPE (49408 ids) through open_clip's `SimpleTokenizer`, whose vocabulary ships with open_clip.

    Texts are cleaned as open_clip cleans them (ftfy, HTML unescaping, whitespace collapsed, lowercased), so
    the ids match `open_clip.tokenize` and decoding returns the cleaned text with words separated by spaces.
    BOS and EOS are CLIP's start/end-of-text tokens and PAD is 0, as in open_clip; 0 is also the token "!",
    which is why `pad_is_token` is set. The BPE tables are built once per process, on first use.
    """

    pad_id = 0
    pad_is_token = True

    def __init__(self) -> None:
        self._bpe = _clip_bpe()
        self.vocab_size = self._bpe.vocab_size
        self.bos_id = self._bpe.sot_token_id
        self.eos_id = self._bpe.eot_token_id

    # Words of at most this many bytes go through open_clip's own BPE (and its cache); longer ones through
    # `bpe_merge`, which gives the same pieces in O(n log n) instead of open_clip's O(n^2).
    _short_word = 64
    # When truncating, a long word is cut after enough bytes for this many pieces beyond those kept, so the kept
    # pieces do not depend on where it was cut.
    _cut_margin = 16

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """The ids `open_clip`'s `SimpleTokenizer.encode` gives, the first `max_tokens` of them if given.

        With `max_tokens`, the work beyond cleaning the text (linear) is bounded by what is kept: words are
        tokenized only until enough ids are found, and a long word only as far as those ids reach.
        """
        check_unicode(text, "text")
        bpe, ids = self._bpe, []
        for match in bpe.pat.finditer(bpe.clean_fn(text)):
            if max_tokens is not None and len(ids) >= max_tokens:
                break
            symbols = [bpe.byte_encoder[b] for b in match.group().encode("utf-8")]
            if len(symbols) <= self._short_word:
                pieces = bpe.bpe("".join(symbols)).split(" ")
            else:
                ends_word = True
                if max_tokens is not None:
                    keep = _longest_clip_piece() * (max_tokens - len(ids) + self._cut_margin)
                    if len(symbols) > keep:
                        symbols, ends_word = symbols[:keep], False
                if ends_word:
                    symbols[-1] += "</w>"
                pieces = bpe_merge(symbols, bpe.bpe_ranks)
            ids.extend(bpe.encoder[piece] for piece in pieces)
        return ids if max_tokens is None else ids[:max_tokens]

    def _decode_tokens(self, ids: list[int]) -> str:
        # SimpleTokenizer ends every word with a space, the last one included.
        return self._bpe.decode(ids).strip()


@functools.lru_cache(maxsize=1)
def _longest_clip_piece() -> int:
    """The most byte symbols one CLIP BPE piece covers: n symbols give at least n / this many pieces."""
    return max(len(piece.removesuffix("</w>")) for piece in _clip_bpe().encoder)


def bpe_merge(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merges of `symbols` by `ranks` (lowest first), as open_clip's `SimpleTokenizer.bpe` applies them.

    open_clip merges every occurrence of the lowest-ranked pair, left to right, then looks again: O(n^2) on one
    long word. This keeps the pairs in a heap ordered by (rank, position) over a linked list of symbols, so each
    merge costs O(log n) and the pieces are the same: a merge only creates pairs of higher rank (their parts must
    exist first), so the occurrences of one rank are still merged left to right before any higher rank.
    """
    n = len(symbols)
    sym: list[str | None] = list(symbols)
    nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
    heap = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = nxt[i] if sym[i] is not None else n
        if j >= n or ranks.get((sym[i], sym[j])) != rank:
            continue  # stale: one of the two symbols has been merged since
        sym[i], sym[j] = sym[i] + sym[j], None
        nxt[i] = nxt[j]
        if nxt[i] < n:
            prv[nxt[i]] = i
            if (right := ranks.get((sym[i], sym[nxt[i]]))) is not None:
                heapq.heappush(heap, (right, i))
        if prv[i] >= 0 and (left := ranks.get((sym[prv[i]], sym[i]))) is not None:
            heapq.heappush(heap, (left, prv[i]))
    return [s for s in sym if s is not None]


# Unicode blocks of CJK ideographs, which BERT splits into one word each (as Chinese has no spaces).
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    # All non-letter, non-digit ASCII counts as punctuation ("$", "^", "`"), not only Unicode's P* categories.
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


# What `basic_tokenize` splits words at: the characters it turns into spaces (" \t\n\r" and Unicode's Zs) and
# those it keeps that `str.split` splits at (U+2028, U+2029). Each piece between them is tokenized on its own, with
# the same words as the whole text, so `encode` can stop once it has enough ids.
_SPACES = re.compile("[^\t\n\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def _pieces_between_spaces(text: str) -> Iterator[str]:
    return (match.group() for match in _SPACES.finditer(text))


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def read_wordpiece_vocab(path: Path) -> list[str]:
    """The tokens of a vocab.txt or of a WordPiece tokenizer.json, in id order.

    Only a regular file of at most `MAX_VOCAB_BYTES` is read: a folder, `/dev/zero`, a FIFO or `/dev/stdin` is
    refused before reading, so building a model never hangs or fills memory on a config's `text.vocab`.

    Raises:
        ConfigError: naming the file, when it is missing, not a regular file, too large, unreadable, not UTF-8, or
            not a WordPiece vocabulary.
    """
    text = read_small_file(path, "text.vocab file", MAX_VOCAB_BYTES, "mmfm.encoders.tokenizers.MAX_VOCAB_BYTES")
    if path.suffix != ".json":
        return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
    try:
        model = json.loads(text)["model"]
        ids = model["vocab"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"text.vocab: {path}: not a Hugging Face tokenizer.json ({type(e).__name__}: {e})") from None
    if model.get("type") != "WordPiece" or model.get("continuing_subword_prefix", "##") != "##":
        raise ConfigError(f"text.vocab: {path}: a {model.get('type')} tokenizer, not BERT's WordPiece with '##'")
    tokens = sorted(ids, key=ids.get)
    if [ids[t] for t in tokens] != list(range(len(tokens))):
        raise ConfigError(f"text.vocab: {path}: the vocabulary's ids are not 0..{len(tokens) - 1}")
    return tokens


class WordPieceTokenizer(Tokenizer):
    """BERT's WordPiece over a vocab.txt file, as Hugging Face's `BertTokenizer` tokenizes.

    Basic tokenization first: control characters and U+FFFD are dropped, whitespace becomes a space, every
    CJK ideograph becomes a word of its own, the text is lowercased and stripped of accents (NFD, combining
    marks removed) as configured, and punctuation splits words, one token per mark. Then each word is
    split greedily into the longest vocabulary pieces from its start, continuation pieces prefixed "##"; a
    word that cannot be split (or is over 100 characters) becomes [UNK]. The special tokens ([CLS], [SEP],
    [PAD], [UNK], [MASK]) written literally in a text are kept whole, as Hugging Face does. Texts are framed
    as `[CLS] tokens [SEP]` and padded with [PAD].

    Args:
        vocab: the vocabulary: a vocab.txt (one token per line; a token's id is its line number, from 0) or a
            Hugging Face tokenizer.json whose model is WordPiece (what transformers 5 saves instead).
        lowercase: lowercase the text (an uncased model).
        strip_accents: remove accents; None follows `lowercase`, as BERT does.

    Raises:
        ConfigError: the file is missing, unreadable, or lacks [PAD], [UNK], [CLS] or [SEP].
    """

    max_chars_per_word = 100

    def __init__(self, vocab: str | Path, lowercase: bool = True, strip_accents: bool | None = None) -> None:
        path = Path(vocab)
        self.tokens = read_wordpiece_vocab(path)
        self.vocab = {token: i for i, token in enumerate(self.tokens)}
        missing = [t for t in _SPECIAL_TOKENS[:4] if t not in self.vocab]
        if missing:
            raise ConfigError(f"text.vocab: {path}: a WordPiece vocabulary needs {', '.join(missing)}")
        self.lowercase = lowercase
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self.vocab_size = len(self.tokens)
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.bos_id, self.eos_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        specials = [t for t in _SPECIAL_TOKENS if t in self.vocab]
        self._special_split = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        check_unicode(text, "text")
        ids = []
        for i, chunk in enumerate(self._special_split.split(text)):
            if max_tokens is not None and len(ids) >= max_tokens:
                break
            if i % 2:  # the split keeps the separators (special tokens) at odd positions
                ids.append(self.vocab[chunk])
                continue
            for piece in _pieces_between_spaces(chunk):
                for word in self.basic_tokenize(piece):
                    ids.extend(self._wordpiece(word))
                if max_tokens is not None and len(ids) >= max_tokens:
                    break
        return ids if max_tokens is None else ids[:max_tokens]

    def basic_tokenize(self, text: str) -> list[str]:
        """Cleaning, CJK splitting, lowercasing, accent stripping and punctuation splitting -> words."""
        chars = []
        for ch in text:
            cp = ord(ch)
            if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
                chars.append(" ")
            elif cp == 0 or cp == 0xFFFD or unicodedata.category(ch).startswith("C"):
                continue
            elif _is_cjk(ch):
                chars.append(f" {ch} ")
            else:
                chars.append(ch)
        words = []
        for word in "".join(chars).split():
            if self.lowercase:
                word = word.lower()
            if self.strip_accents:
                word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
            start = 0
            for j, ch in enumerate(word):
                if _is_punctuation(ch):
                    words.extend(w for w in (word[start:j], ch) if w)
                    start = j + 1
            if word[start:]:
                words.append(word[start:])
        return words

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > self.max_chars_per_word:
            return [self.unk_id]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):  # longest match first
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    pieces.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.unk_id]
        return pieces

    def _decode_tokens(self, ids: list[int]) -> str:
        return " ".join(self.tokens[i] for i in ids).replace(" ##", "").strip()

    def save_vocabulary(self, path: str | Path) -> None:
        """Writes the vocabulary, one token per line in id order, so the file rebuilds this tokenizer."""
        Path(path).write_text("".join(token + "\n" for token in self.tokens), encoding="utf-8")


def build_tokenizer(config: TextConfig) -> Tokenizer:
    """The tokenizer `config.tokenizer` names.

    Raises:
        ConfigError: `config.tokenizer` is unknown, or the "wordpiece" vocabulary or "hf" tokenizer.json cannot be
            read or lacks a token the config names.
    """
    if config.tokenizer == "clip":
        return ClipTokenizer()
    if config.tokenizer == "byte":
        return ByteTokenizer()
    if config.tokenizer == "wordpiece":
        if config.vocab is None:
            raise ConfigError("text.tokenizer 'wordpiece' needs text.vocab, the path of its vocab.txt")
        return WordPieceTokenizer(config.vocab, config.lowercase, config.strip_accents)
    if config.tokenizer == "hf":
        if config.vocab is None:
            raise ConfigError("text.tokenizer 'hf' needs text.vocab, the path of its tokenizer.json")
        return HFTokenizer.from_file(
            config.vocab, config.bos_token, config.eos_token, config.pad_token, config.stop_tokens
        )
    raise ConfigError(f"unknown text.tokenizer {config.tokenizer!r}; expected 'clip', 'byte', 'wordpiece' or 'hf'")
