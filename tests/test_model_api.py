"""The user API on a model that has learned a toy task: captions, labels, zero-shot and embeddings are right."""

import numpy as np
import pytest
import torch

import mmfm
from mmfm.errors import InputError

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.2, 1.0)}
TONES = {"low": 300.0, "high": 3000.0}


def _image(rgb, rng):
    return np.clip(np.array(rgb, dtype=np.float32) + rng.normal(0, 0.05, (36, 36, 3)), 0, 1).astype(np.float32)


def _tone(freq, rng):
    t = np.arange(16000) / 16000
    return (0.5 * np.sin(2 * np.pi * freq * t + rng.uniform(0, 6)) + rng.normal(0, 0.01, t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def trained():
    """mmfm-test trained for a few seconds to caption, classify and align colours and tones."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = mmfm.create_model("mmfm-test", classify={"labels": list(COLOURS)})
    names = list(COLOURS) * 4
    images = model.processors["image"]([_image(COLOURS[n], rng) for n in names])
    labels = torch.tensor([list(COLOURS).index(n) for n in names])
    ids, mask = model.tokenizer(names, 32)
    tone_names = list(TONES) * 4
    audio = model.processors["audio"]([(_tone(TONES[n], rng), 16000) for n in tone_names])
    audio_ids, audio_mask = model.tokenizer(tone_names, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(60):
        loss = (
            model.caption_loss({"image": images}, ids, mask)
            + model.caption_loss({"audio": audio}, audio_ids, audio_mask)
            + model.heads["classify"].loss(model.classify_logits({"image": images}), labels)
            + model.heads["contrastive"].loss(
                model.embed_tensors("image", images), model.embed_tensors("text", ids, mask)
            )
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture()
def held_out():
    rng = np.random.default_rng(123)
    return [_image(COLOURS[n], rng) for n in COLOURS], [(_tone(TONES[n], rng), 16000) for n in TONES]


def test_caption_names_the_colour_and_the_tone(trained, held_out):
    images, clips = held_out
    assert trained.caption(images=images) == list(COLOURS)
    assert trained.caption(images=images, num_beams=3) == list(COLOURS)
    assert trained.caption(audio=clips) == list(TONES)


def test_trained_classifier_labels_and_probabilities(trained, held_out):
    result = trained.classify(images=held_out[0])
    assert result.labels == list(COLOURS) and result.classes == list(COLOURS)
    torch.testing.assert_close(result.probs.sum(-1), torch.ones(3))
    assert [top[0][0] for top in result.top(2)] == list(COLOURS)


def test_zero_shot_classification_through_embeddings(trained, held_out):
    result = trained.classify(images=held_out[0], labels=["blue", "red", "green"])
    assert result.labels == list(COLOURS)
    image_emb, text_emb = trained.embed(images=held_out[0]), trained.embed(text=["blue", "red", "green"])
    expected = trained.heads["contrastive"].logits(image_emb, text_emb).softmax(-1)
    torch.testing.assert_close(result.probs, expected)


def test_embeddings_are_unit_vectors_that_retrieve_the_matching_text(trained, held_out):
    image_emb = trained.embed(images=held_out[0])
    text_emb = trained.embed(text=list(COLOURS))
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(3))
    assert (image_emb @ text_emb.T).argmax(-1).tolist() == [0, 1, 2]


def test_multi_label_head_uses_independent_sigmoids():
    model = mmfm.create_model("mmfm-test", classify={"labels": ["a", "b", "c"], "multi_label": True}).eval()
    result = model.classify(images=[np.zeros((8, 8, 3), np.float32)])
    assert not torch.allclose(result.probs.sum(-1), torch.ones(1))
    assert result.above(0.0) == [["a", "b", "c"]]
    logits, targets = torch.tensor([[5.0, -5.0, 5.0]]), torch.tensor([[1.0, 0.0, 1.0]])
    assert model.heads["classify"].loss(logits, targets) < 0.01


def test_query_pooling_classifier_ignores_nothing_it_should_see():
    model = mmfm.create_model("mmfm-test", classify={"labels": ["x", "y"], "pool": "query"}).eval()
    probs = model.classify(images=[np.zeros((8, 8, 3), np.float32), np.ones((8, 8, 3), np.float32)]).probs
    assert probs.shape == (2, 2) and not torch.allclose(probs[0], probs[1])


def test_missing_modality_and_head_are_named():
    model = mmfm.create_model("mmfm-test", audio=None, classify=None).eval()
    clip = (np.zeros(1600, np.float32), 16000)
    with pytest.raises(InputError, match="no 'audio' encoder"):
        model.caption(audio=[clip])
    with pytest.raises(InputError, match="no 'classify' head.*config.classify"):
        model.classify(images=[np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(InputError, match="exactly one of"):
        model.classify(labels=["a"])
    with pytest.raises(InputError, match="caption needs images=, audio= or a prompt"):
        model.caption()


def test_mismatched_batches_and_bad_labels_are_input_errors(trained, held_out):
    with pytest.raises(InputError, match="same number of items"):
        trained.caption(images=held_out[0], audio=held_out[1])
    with pytest.raises(InputError, match="labels must be a non-empty list"):
        trained.classify(images=held_out[0], labels=[])
    with pytest.raises(InputError, match="embed takes one modality"):
        trained.embed(text=["a"], images=held_out[0])


def test_parameter_counts_cover_every_parameter_once(trained):
    counts = trained.parameter_counts()
    assert counts["heads.caption"] == 0  # tied to the text embedding, counted there
    assert sum(counts.values()) == sum(p.numel() for p in trained.parameters())


def test_every_pipeline_follows_the_models_dtype_and_batches_give_the_same_answers(trained):
    model, rng = trained, np.random.default_rng(1)
    images = [_image(COLOURS[n], rng) for n in ("red", "green", "blue", "red", "blue")]
    clips = [(_tone(TONES[n], rng), 16000) for n in ("low", "high", "low")]
    one_batch = model.classify(images=images).probs
    torch.testing.assert_close(model.classify(images=images, batch_size=2).probs, one_batch)
    assert model.caption(images=images, batch_size=2) == model.caption(images=images)
    torch.testing.assert_close(model.embed(audio=clips, batch_size=1), model.embed(audio=clips), atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="batch_size must be a whole number >= 1, got 0"):
        model.embed(images=images, batch_size=0)
    with pytest.raises(InputError, match="images= is empty"):
        model.embed(images=[])

    half = mmfm.create_model("mmfm-test", classify={"labels": list(COLOURS)}).eval()
    half.load_state_dict(model.state_dict())
    half.to(torch.bfloat16)
    assert half.caption(images=images[:2], max_new_tokens=4) and len(half.caption(images=images[:2])) == 2
    assert half.classify(images=images).labels == model.classify(images=images).labels
    assert half.classify(audio=clips, labels=list(TONES)).probs.shape == (3, 2)
    assert half.embed(text=["a red square"]).dtype == torch.bfloat16
    assert half.generate_image(text=["red"], num_inference_steps=2)[0].size == (16, 16)
