"""Text towers and per-modality embedding sources: configs, errors, and which path embed/classify take."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmfm
from mmfm.errors import ConfigError
from mmfm.registry import read_config

CLIP_TOWER = {"kind": "clip", "context_length": 32, "width": 32, "depth": 1, "num_heads": 2, "embed_dim": 32}


def _model(**overrides):
    torch.manual_seed(0)
    return mmfm.create_model("mmfm-test", audio=None, image_gen=None, **overrides).eval()


def test_text_from_the_tower_and_images_from_the_backbone():
    model = _model(text={"tokenizer": "clip", "tower": CLIP_TOWER}, contrastive={"source": {"text": "tower"}})
    texts = ["a cat", "a dog on a mat"]
    images = [np.full((8, 8, 3), v, np.float32) for v in (0.1, 0.9)]

    ids, mask = model.tokenizer(texts, model.config.text.max_length)
    with torch.no_grad():
        expected_text = F.normalize(model.towers["text"](ids, mask), dim=-1)
        pixels = model.processors["image"](images)
        seq = model.sequence({"image": pixels})
        expected_image = model.heads["contrastive"]("image", model.hidden(seq), seq.mask)

    torch.testing.assert_close(model.embed(text=texts), expected_text)
    torch.testing.assert_close(model.embed(images=images), expected_image)
    assert set(model.heads["contrastive"].proj) == {"image"}  # no projection for the tower's modality
    probs = model.classify(images=images, labels=["cat", "dog"]).probs
    torch.testing.assert_close(
        probs, model.heads["contrastive"].logits(expected_image, model.embed(text=["cat", "dog"])).softmax(-1)
    )
    assert "towers.text" in model.parameter_counts()


def test_images_from_the_encoders_pooled_head():
    model = _model(
        image={"global_pool": "avg", "head_dim": 32, "head_bias": False}, contrastive={"source": {"image": "tower"}}
    )
    encoder = model.encoders["image"]
    pixels = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        features = encoder.vit.forward_features(pixels)
        pooled = encoder.vit.fc_norm(features[:, encoder.vit.num_prefix_tokens :].mean(1))  # timm: "avg" norms after
        expected = F.normalize(encoder.vit.head(pooled), dim=-1)
        torch.testing.assert_close(model.embed_tensors("image", pixels), expected)
    assert encoder.vit.head.bias is None and encoder.pooled_dim == 32
    assert isinstance(encoder.vit.fc_norm, torch.nn.LayerNorm) and isinstance(encoder.vit.norm, torch.nn.Identity)


def test_a_tower_config_round_trips_yaml(tmp_path):
    config = _model(
        text={"tokenizer": "clip", "tower": {**CLIP_TOWER, "act": "quick_gelu"}},
        contrastive={"source": {"text": "tower", "image": "backbone"}},
    ).config
    config.save(tmp_path / "config.yaml")
    assert read_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"contrastive": {"source": {"text": "tower"}}},
            "contrastive.source.text is 'tower' but text.tower is not set",
        ),
        (
            {
                "text": {"tokenizer": "clip", "tower": {**CLIP_TOWER, "embed_dim": 16}},
                "contrastive": {"source": {"text": "tower"}},
            },
            "text.tower outputs 16 wide embeddings but contrastive.embed_dim is 32",
        ),
        (
            {"contrastive": {"source": {"image": "tower"}}},
            "contrastive.source.image is 'tower' but image.global_pool is not set",
        ),
        (
            {"image": {"global_pool": "token", "head_dim": 8}, "contrastive": {"source": {"image": "tower"}}},
            "the image tower outputs 8 wide embeddings, not contrastive.embed_dim = 32",
        ),
        (
            {"text": {"tokenizer": "byte", "tower": CLIP_TOWER}},
            r"text.tower.vocab_size \(49408\) differs from the 'byte' tokenizer's vocabulary \(259 ids\)",
        ),
        (
            {"text": {"tokenizer": "clip", "tower": {**CLIP_TOWER, "num_heads": 3}}},
            r"text.tower.num_heads \(3\) must divide text.tower.width \(32\)",
        ),
        (
            {"text": {"tokenizer": "clip", "max_length": 40, "tower": CLIP_TOWER}},
            r"text.max_length \(40\) exceeds text.tower.context_length \(32\)",
        ),
        ({"contrastive": {"source": {"audio": "tower"}}}, r"'contrastive.source.audio' must be one of \['backbone'\]"),
        ({"text": {"vocab": "vocab.txt"}}, "text.vocab is read only by the 'wordpiece' and 'hf' tokenizers"),
    ],
)
def test_impossible_tower_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _model(**overrides)


def test_too_long_text_for_the_tower_is_an_input_error():
    model = _model(text={"tokenizer": "clip", "tower": CLIP_TOWER}, contrastive={"source": {"text": "tower"}})
    ids = torch.zeros(1, 33, dtype=torch.long)
    with pytest.raises(mmfm.InputError, match=r"at most 32 tokens \(text.tower.context_length\)"):
        model.embed_tensors("text", ids, torch.ones_like(ids, dtype=torch.bool))
