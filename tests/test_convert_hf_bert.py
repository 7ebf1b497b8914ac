"""Hugging Face BERT -> mmfm text tower: tiny random BERTs saved by transformers / sentence-transformers, parity."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer

import mmfm
from mmfm.convert import convert
from mmfm.errors import CheckpointError, ConfigError
from mmfm.loader import from_converted

WORDS = "the a cat dog sat on mat red blue car is are play ##s ##ing ##ed run walk quick brown fox jump over lazy"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *".,!?'-", *WORDS.split(), "un", "##believ", "##able"]
TEXTS = ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog!", "dogs playing", "unbelievable", "?"]


def _bert_dir(tmp_path, model_class=BertModel, **config):
    """A tiny random BERT saved by transformers: config.json, model.safetensors, vocab.txt, tokenizer files."""
    directory = tmp_path / "bert"
    directory.mkdir()
    (directory / "vocab.txt").write_text("".join(t + "\n" for t in VOCAB))
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(0)
    settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    settings.update(max_position_embeddings=64, vocab_size=len(VOCAB), hidden_dropout_prob=0.0)
    reference = model_class(BertConfig(**{**settings, **config})).eval()
    reference.save_pretrained(directory)
    return directory, reference


def _sentence_transformer(tmp_path, modules):
    """Builds a SentenceTransformer around the tiny BERT, saves it in its own format and reads it back."""
    out = tmp_path / "st"
    SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out, SentenceTransformer(str(out), device="cpu")


@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_sentence_embeddings_match_sentence_transformers(tmp_path, mode):
    directory, _ = _bert_dir(tmp_path)
    st_dir, st = _sentence_transformer(
        tmp_path, [Transformer(str(directory), max_seq_length=48), Pooling(32, pooling_mode=mode), Normalize()]
    )

    model, fresh = from_converted(convert("hf_bert", st_dir), "mmfm-test", str(st_dir))

    assert "towers.text" not in fresh and model.config.text.tower.pooling == mode
    assert model.config.text.max_length == 48
    torch.testing.assert_close(model.embed(text=TEXTS), st.encode(TEXTS, convert_to_tensor=True))


def test_last_hidden_states_match_bert_model(tmp_path):
    directory, reference = _bert_dir(tmp_path)
    model, _ = from_converted(convert("hf_bert", directory), "mmfm-test", str(directory))
    hf = BertTokenizer.from_pretrained(str(directory))(TEXTS, padding=True, return_tensors="pt")

    ids, mask = model.tokenizer(TEXTS, model.config.text.max_length)

    assert torch.equal(ids, hf["input_ids"]) and torch.equal(mask, hf["attention_mask"].bool())
    with torch.no_grad():
        ours = model.towers["text"].forward_features(ids, mask)
        theirs = reference(**hf).last_hidden_state
    torch.testing.assert_close(ours[mask], theirs[mask])  # padding positions carry no meaning
    expected = torch.nn.functional.normalize((theirs * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    torch.testing.assert_close(model.embed(text=TEXTS), expected)  # no sentence-transformers files: mean pooling


def test_task_model_directory_loads_through_mmfm_load(tmp_path):
    directory, reference = _bert_dir(tmp_path, BertForMaskedLM)  # keys under bert., plus an MLM head

    with pytest.warns(UserWarning, match="freshly initialised"):
        model = mmfm.load(directory, base="mmfm-test")  # config.json's model_type "bert" picks the converter

    ids, mask = model.tokenizer(TEXTS[:2], 32)
    with torch.no_grad():
        theirs = reference.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        torch.testing.assert_close(model.towers["text"].forward_features(ids, mask)[mask], theirs[mask])


def test_vocabulary_travels_with_save_pretrained(tmp_path):
    directory, _ = _bert_dir(tmp_path)
    model, _ = from_converted(convert("hf_bert", directory), "mmfm-test", str(directory))
    expected = model.embed(text=TEXTS)
    model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(directory)  # the saved model must not need the source directory

    again = mmfm.load(tmp_path / "saved")

    assert "vocab: vocab.txt" in (tmp_path / "saved" / "config.yaml").read_text()
    assert (tmp_path / "saved" / "vocab.txt").read_text().split("\n")[: len(VOCAB)] == VOCAB
    torch.testing.assert_close(again.embed(text=TEXTS), expected)


def test_unsupported_configs_and_modules_are_named(tmp_path):
    directory, _ = _bert_dir(tmp_path)
    config = json.loads((directory / "config.json").read_text())

    (directory / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    with pytest.raises(ConfigError, match="model_type 'roberta' is not a BERT-family encoder"):
        convert("hf_bert", directory)
    (directory / "config.json").write_text(json.dumps({**config, "position_embedding_type": "relative_key"}))
    with pytest.raises(ConfigError, match="position_embedding_type='relative_key'"):
        convert("hf_bert", directory)
    (directory / "config.json").write_text(json.dumps(config))

    st_dir, _ = _sentence_transformer(tmp_path, [Transformer(str(directory)), Pooling(32), Dense(32, 8)])
    with pytest.raises(ConfigError, match="modules mmfm does not model: .*Dense"):
        convert("hf_bert", st_dir)


def test_weights_that_do_not_fit_the_config_list_every_bad_key(tmp_path):
    directory, _ = _bert_dir(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3, "intermediate_size": 48}))

    with pytest.raises(CheckpointError) as info:
        convert("hf_bert", directory)

    message = str(info.value)
    assert "model.safetensors" in message and "3 layers" in message
    assert "missing keys (12): blocks.2.attn.proj.bias" in message
    assert "mis-shaped keys (6)" in message and "blocks.0.mlp.fc1.weight: file (64, 32) vs (48, 32)" in message


def test_a_vocabulary_of_another_size_is_refused(tmp_path):
    directory, _ = _bert_dir(tmp_path)
    (directory / "vocab.txt").write_text("".join(t + "\n" for t in VOCAB[:-3]))
    with pytest.raises(CheckpointError, match=f"{len(VOCAB) - 3} tokens, but config.json says vocab_size {len(VOCAB)}"):
        convert("hf_bert", directory)
