"""Template ensembling gives open_clip's zero-shot classifier weights; `classify(labels=...)` classifies with them."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from open_clip.push_to_hf_hub import save_config_for_hf
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES
from PIL import Image
from safetensors.torch import save_file

from mmfm.convert import convert
from mmfm.eval.classification import zero_shot_weights
from mmfm.loader import from_converted

NAME = "mmfm-test-clip-zero-shot"
TINY = {  # the tiny CLIP of tests/test_convert_open_clip.py
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLASSES = ["cat", "dog", "red car", "bird", "tree"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "{}", "art of a {}, drawn badly"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """(open_clip reference, the same CLIP converted into mmfm with `TEMPLATES` as its zero-shot templates)."""
    directory = tmp_path_factory.mktemp("clip")
    (directory / f"{NAME}.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(directory / f"{NAME}.json")
    torch.manual_seed(0)
    reference = open_clip.create_model(NAME).eval()
    save_file(reference.state_dict(), directory / "open_clip_model.safetensors")
    save_config_for_hf(reference, directory / "open_clip_config.json", TINY)
    converted = convert("open_clip", directory)
    converted.config["contrastive"].templates = TEMPLATES
    model, _ = from_converted(converted, "mmfm-test", str(directory))
    return reference, model


@pytest.mark.parametrize("templates", [TEMPLATES, SIMPLE_IMAGENET_TEMPLATES], ids=["strings", "open_clip_imagenet"])
def test_template_ensembling_reproduces_open_clip_classifier_weights(clips, templates):
    reference, model = clips
    tokenizer = open_clip.get_tokenizer(NAME)

    weights = zero_shot_weights(lambda texts: model.embed(text=texts), CLASSES, templates)  # (C, E)

    expected = build_zero_shot_classifier(reference, tokenizer, CLASSES, templates, num_classes_per_batch=2)  # (E, C)
    torch.testing.assert_close(weights, expected.T)


def test_classify_with_labels_uses_the_ensembled_weights(clips):
    reference, model = clips
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]

    result = model.classify(images=images, labels=CLASSES)

    _, _, preprocess = open_clip.create_model_and_transforms(NAME)
    with torch.no_grad():
        weights = build_zero_shot_classifier(reference, open_clip.get_tokenizer(NAME), CLASSES, TEMPLATES)
        features = reference.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        expected = (reference.logit_scale.exp() * features @ weights).softmax(dim=-1)
    torch.testing.assert_close(result.probs, expected)
    with torch.no_grad():  # the test can fail: one template alone gives other probabilities than the ensemble
        one = reference.encode_text(open_clip.get_tokenizer(NAME)([f"a photo of a {c}." for c in CLASSES]), True)
    assert not torch.allclose(result.probs, (reference.logit_scale.exp() * features @ one.T).softmax(dim=-1))
