"""Checkpoints written by earlier releases keep loading and give the same outputs (keys renamed on the way in)."""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import mmfm
from mmfm.checkpoint import WEIGHTS_NAME

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY = FIXTURES / "legacy-0.1.0"  # mmfm-test saved by mmfm 0.1.0: see fixtures/make_legacy_0_1_0.py


def test_a_0_1_0_checkpoint_loads_and_gives_its_recorded_outputs():
    assert "encoders.text.embed.weight" in load_file(LEGACY / WEIGHTS_NAME)  # the old key is really there
    model = mmfm.load(LEGACY)
    expected = load_file(FIXTURES / "legacy-0.1.0-outputs.safetensors")
    recorded = json.loads((FIXTURES / "legacy-0.1.0-outputs.json").read_text())
    images = list(expected["images"].numpy())
    audio = [(a, recorded["sample_rate"]) for a in expected["audio"].numpy()]
    assert model.caption(images=images, max_new_tokens=8) == recorded["captions"]
    torch.testing.assert_close(model.classify(audio=audio).probs, expected["classify_probs"])
    torch.testing.assert_close(model.embed(text=["a cat", "two dogs"]), expected["embed_text"])
    torch.testing.assert_close(model.embed(images=images), expected["embed_images"])
    generated = model.generate_image(text=["a seven"], num_inference_steps=3, seed=0)[0]
    assert np.array_equal(np.asarray(generated), expected["generated"].numpy())
    ids, mask = model.tokenizer(["hi", "a longer one"], 8)
    logits = model.caption_logits({"image": model.processors["image"](images)}, ids, mask)
    torch.testing.assert_close(logits, expected["caption_logits"])


def test_the_renamed_embedding_is_tied_to_the_lm_head_after_loading(tmp_path):
    model = mmfm.load(LEGACY)
    assert model.heads["caption"].lm_head.weight is model.token_embedding.weight
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / WEIGHTS_NAME).keys()
    assert "token_embedding.weight" in keys and "encoders.text.embed.weight" not in keys
