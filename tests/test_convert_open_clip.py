"""open_clip -> mmfm towers: tiny random CLIPs saved in open_clip's formats give open_clip's features and zero-shot."""

from __future__ import annotations

import json
import math

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import resize_pos_embed
from open_clip.push_to_hf_hub import save_config_for_hf
from PIL import Image
from safetensors.torch import save_file

import mmfm
from mmfm.convert import convert
from mmfm.errors import CheckpointError, ConfigError
from mmfm.loader import from_converted
from mmfm.pretrained import PretrainedEntry, register_pretrained, unregister_pretrained

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
LABELS = ["cat", "dog", "red car", "bird"]


def _register(tmp_path, name, config):
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")


def _reference(name):
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(42.0))  # not the init value: the converted model must take the file's
    return model


@pytest.fixture(params=[False, True], ids=["gelu", "quick_gelu"])
def hub_dir(tmp_path, request):
    """A tiny CLIP in open_clip's hub layout: open_clip_model.safetensors + open_clip_config.json."""
    name = f"mmfm-test-clip-{'quickgelu' if request.param else 'gelu'}"
    config = {**TINY, "quick_gelu": request.param}
    _register(tmp_path, name, config)
    reference = _reference(name)
    save_file(reference.state_dict(), tmp_path / "open_clip_model.safetensors")
    save_config_for_hf(reference, tmp_path / "open_clip_config.json", config)
    return tmp_path, name, reference


def _images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def test_image_and_text_features_match_open_clip(hub_dir):
    directory, name, reference = hub_dir
    model, _ = from_converted(convert("open_clip", directory), "mmfm-test", str(directory))
    pixels = torch.randn(3, 3, 32, 32)
    texts = ["a photo of a cat.", "two dogs playing in the snow", "", "x " * 40]  # the last one is truncated
    ids, mask = model.tokenizer(texts, model.config.text.max_length)

    with torch.no_grad():
        torch.testing.assert_close(model.embed_tensors("image", pixels), reference.encode_image(pixels, normalize=True))
        expected = reference.encode_text(open_clip.get_tokenizer(name)(texts), normalize=True)
        torch.testing.assert_close(model.embed_tensors("text", ids, mask), expected)
        # the image encoder's token path (what the backbone reads) is open_clip's patch tokens after ln_post
        reference.visual.output_tokens = True
        _, tokens = reference.visual(pixels)
        torch.testing.assert_close(model.encoders["image"](pixels), tokens)
    assert model.config.contrastive.source.text == model.config.contrastive.source.image == "tower"


def test_zero_shot_classify_reproduces_open_clip_probabilities(hub_dir):
    directory, name, reference = hub_dir
    model, _ = from_converted(convert("open_clip", directory), "mmfm-test", str(directory))
    images = _images()

    result = model.classify(images=images, labels=LABELS)

    _, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        image_features = reference.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        text_features = reference.encode_text(tokenizer([f"a photo of a {c}." for c in LABELS]), normalize=True)
        expected = (reference.logit_scale.exp() * image_features @ text_features.T).softmax(dim=-1)
    torch.testing.assert_close(result.probs, expected)
    assert result.classes == LABELS
    torch.testing.assert_close(model.heads["contrastive"].logit_scale, reference.logit_scale.reshape(1))


def test_text_tower_alone_from_a_torch_file_with_model_name(tmp_path):
    _register(tmp_path, "mmfm-test-clip-file", TINY)
    reference = _reference("mmfm-test-clip-file")
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(reference.state_dict(), path)

    converted = convert("open_clip", path, model_name="mmfm-test-clip-file", towers=("text",))
    model, fresh = from_converted(converted, "mmfm-test", str(path))

    assert set(converted.config) == {"text", "contrastive"} and "encoders.image" in fresh
    assert (model.config.contrastive.source.text, model.config.contrastive.source.image) == ("tower", "backbone")
    texts = ["a diagram", "a photo of a dog."]
    with torch.no_grad():
        expected = reference.encode_text(open_clip.get_tokenizer("mmfm-test-clip-file")(texts), normalize=True)
        torch.testing.assert_close(model.embed(text=texts), expected)


def test_other_image_size_resamples_the_position_embedding_as_open_clip_does(hub_dir):
    directory, name, reference = hub_dir
    model, _ = from_converted(convert("open_clip", directory, img_size=48), "mmfm-test", str(directory))

    resized = open_clip.create_model(name, force_image_size=48).eval()
    state = reference.state_dict()
    resize_pos_embed(state, resized)
    resized.load_state_dict(state)
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.embed_tensors("image", pixels), resized.encode_image(pixels, normalize=True))


def test_load_by_tag_and_save_pretrained_round_trip(hub_dir, tmp_path_factory):
    directory, _, reference = hub_dir
    register_pretrained(
        PretrainedEntry(tag="test-tiny-clip", source="open_clip", path=str(directory), base="mmfm-test")
    )
    try:
        with pytest.warns(UserWarning, match="freshly initialised"):
            model = mmfm.load("test-tiny-clip")
    finally:
        unregister_pretrained("test-tiny-clip")
    out = tmp_path_factory.mktemp("saved")
    model.save_pretrained(out)
    again = mmfm.load(out)
    images = _images(2, seed=1)
    torch.testing.assert_close(
        again.classify(images=images, labels=LABELS).probs, model.classify(images=images, labels=LABELS).probs
    )


def test_a_tower_the_checkpoint_lacks_or_an_unknown_tower_is_named(tmp_path):
    _register(tmp_path, "mmfm-test-clip-visual", TINY)
    reference = _reference("mmfm-test-clip-visual")
    path = tmp_path / "visual.safetensors"
    save_file({k: v for k, v in reference.state_dict().items() if k.startswith("visual.")}, path)

    with pytest.raises(
        CheckpointError, match=r"no text tower in this checkpoint \(asked for image, text; it has: image\)"
    ):
        convert("open_clip", path, model_name="mmfm-test-clip-visual")
    with pytest.raises(ConfigError, match=r"towers must be some of image, text; got \['audio'\]"):
        convert("open_clip", path, model_name="mmfm-test-clip-visual", towers=("audio",))
    image_only = convert("open_clip", path, model_name="mmfm-test-clip-visual", towers=("image",))
    assert set(image_only.config) == {"image", "contrastive"}


def test_an_architecture_name_that_does_not_fit_the_file_lists_the_bad_keys(hub_dir):
    directory, _, _ = hub_dir
    with pytest.raises(CheckpointError) as info:
        convert("open_clip", directory / "open_clip_model.safetensors", model_name="ViT-B-32")
    message = str(info.value)
    assert "open_clip_model.safetensors" in message and "width 768, depth 12, patch 32" in message
    assert (
        "missing keys" in message
        and "mis-shaped keys" in message
        and "cls_token: file (1, 1, 32) vs (1, 1, 768)" in message
    )
    with pytest.raises(ConfigError, match="'ViT-B-3' is not an open_clip architecture.*did you mean 'ViT-B-32'"):
        convert("open_clip", directory / "open_clip_model.safetensors", model_name="ViT-B-3")


def test_unmodelled_open_clip_features_are_refused_by_name(tmp_path):
    config = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "ls_init_value": 1e-5}, "init_logit_bias": -10.0}
    _register(tmp_path, "mmfm-test-clip-ls", config)
    path = tmp_path / "ls.safetensors"
    save_file(open_clip.create_model("mmfm-test-clip-ls").state_dict(), path)
    with pytest.raises(ConfigError, match=r"init_logit_bias=-10.0, vision_cfg.ls_init_value=1e-05"):
        convert("open_clip", path, model_name="mmfm-test-clip-ls")
