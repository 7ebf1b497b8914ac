"""Tokenizers and the text encoder: round trips, parity with open_clip, padding, truncation and errors."""

import random
import re
import string
import time

import numpy as np
import open_clip
import pytest
import torch

from mmfm.config import TextConfig
from mmfm.encoders.token_embedding import TokenEmbedding
from mmfm.encoders.tokenizers import ByteTokenizer, ClipTokenizer, build_tokenizer
from mmfm.errors import ConfigError, InputError

A, B, C, D = (ord(ch) + 3 for ch in "abcd")  # byte-tokenizer ids of "a".."d"


@pytest.fixture(scope="module")
def byte_tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def clip_tok():
    return ClipTokenizer()


BYTE_TEXTS = ["A photo of a cat, 42!", "Crème brûlée à la café", "party 🎉🐱", "你好，世界", "", "tab\tand\nnewline"]
# Cleaned text (lowercase, single spaces, words apart from punctuation) is what CLIP decoding gives back.
CLIP_TEXTS = ["a photo of a cat", "crème brûlée à la café", "party time 🎉🐱", "你好 世界", "hi !~"]


@pytest.mark.parametrize("text", BYTE_TEXTS)
def test_byte_round_trip(byte_tok, text):
    ids = byte_tok.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert byte_tok.decode(ids) == text
    batch, _ = byte_tok([text], max_length=1000)
    assert byte_tok.decode(batch[0]) == text


@pytest.mark.parametrize("text", CLIP_TEXTS)
def test_clip_round_trip(clip_tok, text):
    assert clip_tok.decode(clip_tok.encode(text)) == text
    batch, _ = clip_tok([text], max_length=77)
    assert clip_tok.decode(batch[0]) == text


def test_clip_decode_returns_cleaned_text(clip_tok):
    assert clip_tok.decode(clip_tok.encode("  A Photo,  of a CAT!")) == "a photo , of a cat !"


def test_clip_special_ids_match_open_clip(clip_tok):
    assert (clip_tok.vocab_size, clip_tok.bos_id, clip_tok.eos_id, clip_tok.pad_id) == (49408, 49406, 49407, 0)


def test_clip_bpe_is_built_once(clip_tok):
    assert ClipTokenizer()._bpe is clip_tok._bpe


@pytest.mark.parametrize(
    "text",
    [
        "A photo of a CAT sitting on a mat.",
        "  Two   dogs &amp; a ball!! ",
        "Café, naïve résumé 😀 你好 123",
    ],
)
def test_clip_ids_match_open_clip(clip_tok, text):
    ids, mask = clip_tok([text], max_length=77)
    expected = open_clip.tokenize([text])[0].tolist()
    expected = expected[: expected.index(clip_tok.eos_id) + 1]  # open_clip pads to 77; 0 is also "!"
    assert ids[0].tolist() == expected
    assert mask.all()


def test_clip_truncation_matches_open_clip(clip_tok):
    text = " ".join(f"word{i}" for i in range(100))
    ids, mask = clip_tok([text], max_length=77)
    assert ids.shape == (1, 77) and mask.all()
    assert ids[0].tolist() == open_clip.tokenize([text])[0].tolist()


def test_right_padding_to_longest(byte_tok):
    ids, mask = byte_tok(["ab", "a"], max_length=100)
    assert ids.tolist() == [[1, A, B, 2], [1, A, 2, 0]]
    assert mask.tolist() == [[True, True, True, True], [True, True, True, False]]
    assert ids.dtype == torch.long and mask.dtype == torch.bool


def test_left_padding(byte_tok):
    ids, mask = byte_tok(["ab", "a"], max_length=100, padding_side="left")
    assert ids.tolist() == [[1, A, B, 2], [0, 1, A, 2]]
    assert mask.tolist() == [[True, True, True, True], [False, True, True, True]]


def test_clip_left_padding_decodes(clip_tok):
    ids, mask = clip_tok(["a photo of a cat", "dog"], max_length=77, padding_side="left")
    assert ids.shape == (2, 7)  # BOS + 5 tokens + EOS
    assert mask[1].tolist() == [False] * 4 + [True] * 3
    assert ids[1, :4].tolist() == [0] * 4
    assert [clip_tok.decode(row) for row in ids] == ["a photo of a cat", "dog"]


def test_single_string_is_a_batch_of_one(byte_tok):
    ids, mask = byte_tok("ab", max_length=10)
    assert ids.tolist() == [[1, A, B, 2]] and mask.all()


def test_truncation_keeps_bos_first_tokens_and_eos(byte_tok):
    ids, mask = byte_tok(["abcdef", "a"], max_length=5)
    assert ids.tolist() == [[1, A, B, C, 2], [1, A, 2, 0, 0]]
    assert mask.sum(dim=1).tolist() == [5, 3]
    ids, _ = byte_tok(["abcdef"], max_length=2)
    assert ids.tolist() == [[1, 2]]


def test_add_eos_false(byte_tok):
    ids, mask = byte_tok(["abcdef", "a"], max_length=5, add_eos=False, padding_side="left")
    assert ids.tolist() == [[1, A, B, C, D], [0, 0, 0, 1, A]]
    assert mask.tolist() == [[True] * 5, [False] * 3 + [True] * 2]
    assert 2 not in ids.tolist()[1]


def test_max_length_too_small(byte_tok):
    with pytest.raises(ValueError, match="max_length"):
        byte_tok(["abc"], max_length=1)


def test_decode_stops_at_eos_and_skips_pad_and_bos(byte_tok):
    assert byte_tok.decode([0, 0, 1, ord("h") + 3, 0, ord("i") + 3, 2, A, 0]) == "hi"
    assert byte_tok.decode(torch.tensor([1, A, B, 2, C])) == "ab"


def test_clip_decode_keeps_exclamation_mark(clip_tok):
    # PAD is 0, which is also CLIP's "!": decode must not drop it from the text.
    assert clip_tok.encode("hi !~") == [1883, 0, 349]
    for padding_side in ("right", "left"):
        ids, _ = clip_tok(["hi !~", "a photo of a cat"], max_length=77, padding_side=padding_side)
        assert clip_tok.decode(ids[0]) == "hi !~"
    assert clip_tok.decode([0, 349, clip_tok.eos_id, 0, 0]) == "!~"


def test_decode_invalid_utf8_does_not_raise(byte_tok):
    assert byte_tok.decode([1, 0xFF + 3, A, 0xC3 + 3, 2]) == "\ufffda\ufffd"


def test_decode_rejects_batched_tensor(byte_tok):
    with pytest.raises(InputError, match="1-D"):
        byte_tok.decode(torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize(
    ("texts", "match"),
    [(["ok", 3], r"texts\[1\].*int"), (["ok", None], r"texts\[1\].*NoneType"), (b"bytes", "bytes"), ([], "empty")],
)
def test_non_str_input_raises(byte_tok, clip_tok, texts, match):
    for tok in (byte_tok, clip_tok):
        with pytest.raises(InputError, match=match):
            tok(texts, max_length=10)


def test_build_tokenizer():
    assert isinstance(build_tokenizer(TextConfig(tokenizer="byte")), ByteTokenizer)
    assert isinstance(build_tokenizer(TextConfig(tokenizer="clip")), ClipTokenizer)
    with pytest.raises(ConfigError, match="tokenizer"):
        build_tokenizer(TextConfig(tokenizer="sentencepiece"))


def test_token_embedding_shape_and_init(byte_tok):
    torch.manual_seed(0)
    encoder = TokenEmbedding(byte_tok.vocab_size, dim=64)
    ids, _ = byte_tok(["a photo", "a cat"], max_length=16)
    out = encoder(ids)
    assert out.shape == (2, ids.shape[1], 64)
    torch.testing.assert_close(out[0, 1], encoder.weight[A])
    assert abs(encoder.weight.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("bad", [259, -1])
def test_token_embedding_rejects_out_of_range_ids(bad):
    encoder = TokenEmbedding(259, dim=8)
    with pytest.raises(InputError, match=r"\[0, 259\)"):
        encoder(torch.tensor([[1, 5, bad]]))


# Hostile and careless text (issue 11): bounded work, and errors that name the text.


def random_letters(n: int, alphabet: str = string.ascii_lowercase, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("n", [16_000, 32_000])
def test_clip_work_is_bounded_by_what_truncation_keeps(clip_tok, n):
    text = random_letters(n)  # one long word: open_clip's BPE is quadratic in it (9 s for 32k characters)
    start = time.perf_counter()
    ids, mask = clip_tok([text], max_length=77)
    assert time.perf_counter() - start < 1.0
    assert ids.shape == (1, 77) and mask.all()


def test_clip_truncation_of_a_long_word_matches_open_clip(clip_tok):
    # max_length 10 cuts the 1500-character word before its BPE; the kept ids are open_clip's
    for text in [random_letters(1500), "a " + random_letters(1500, "aeiounst", seed=1) + " cat"]:
        ids, _ = clip_tok([text], max_length=10)
        assert ids[0].tolist() == open_clip.tokenize([text], context_length=10)[0].tolist()


def test_clip_long_words_merge_as_open_clip_does():
    from mmfm.encoders.tokenizers import _clip_bpe, bpe_merge

    bpe = _clip_bpe()
    for i, alphabet in enumerate([string.ascii_lowercase, "ab", "aeiounst", "éàü漢字", "!?.-"]):
        word = "".join(bpe.byte_encoder[b] for b in random_letters(300, alphabet, seed=i).encode())
        symbols = [*word[:-1], word[-1] + "</w>"]
        assert bpe_merge(symbols, bpe.bpe_ranks) == bpe.bpe(word).split(" ")


def test_encode_with_max_tokens_is_the_start_of_encode(byte_tok, clip_tok):
    texts = ["A photo of a CAT, 42!", "你好，世界 party 🎉🐱", "x" * 300 + " tail", ""]
    for tok in (byte_tok, clip_tok):
        for text in texts:
            full = tok.encode(text)
            for k in (1, 3, 50):
                assert tok.encode(text, max_tokens=k) == full[:k]


@pytest.mark.parametrize("text", ["\ud800", "cat \udcff dog", "ok \ud83d\ude00"])
def test_lone_surrogates_are_input_errors_naming_the_text(byte_tok, clip_tok, text):
    for tok in (byte_tok, clip_tok):
        with pytest.raises(InputError, match=r"texts\[1\] holds a lone surrogate \(U\+D[89A-F][0-9A-F]{2}"):
            tok(["fine", text], max_length=16)
        with pytest.raises(InputError, match="text holds a lone surrogate"):
            tok.encode(text)


@pytest.mark.parametrize("bad", [-1, 259, 10**20, 1.5, True, "7"])
def test_decoding_something_other_than_an_id_is_named(byte_tok, bad):
    with pytest.raises(
        InputError, match=rf"decode: token ids must be whole numbers in \[0, 259\), got {re.escape(repr(bad))}"
    ):
        byte_tok.decode([A, bad])
    assert byte_tok.decode([A, np.int64(B)]) == "ab"  # numpy integers are ids too
