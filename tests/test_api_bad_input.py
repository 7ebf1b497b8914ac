"""Careless and hostile arguments to the Python API: each is an `mmfm` error naming the argument, never a silent
wrong answer (a string read letter by letter, dict keys, a set's arbitrary order, split probabilities) and never
a raw TypeError/RuntimeError from deep inside torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmfm
from mmfm.errors import InputError

IMAGE = np.zeros((16, 16, 3), np.float32)
CLIP = (np.zeros(1600, np.float32), 16000)


@pytest.fixture(scope="module")
def model() -> mmfm.MultimodalModel:
    torch.manual_seed(0)
    return mmfm.create_model("mmfm-test").eval()


# ---- strings, dicts and sets where a list is expected ----


@pytest.mark.parametrize(
    ("labels", "expected"),
    [("cat", "pass labels=['cat']"), ("cat,dog", "pass labels=['cat', 'dog']"), ("a, b,c", "['a', 'b', 'c']")],
)
def test_a_string_of_labels_is_refused_not_read_letter_by_letter(model, labels, expected):
    with pytest.raises(InputError, match="labels= must be a list of class names") as e:
        model.classify(images=[IMAGE], labels=labels)
    assert repr(labels) in str(e.value) and expected in str(e.value)


@pytest.mark.parametrize(
    ("argument", "value"),
    [("images", "cat.png"), ("images", b"cat.png"), ("audio", "bark.wav")],
)
def test_a_string_for_a_media_list_is_refused_with_what_to_pass(model, argument, value):
    with pytest.raises(InputError, match=f"{argument}= must be a list of .*for one item pass {argument}=\\["):
        model.embed(**{argument: value})


def test_one_image_or_one_audio_pair_without_a_list_is_refused(model):
    from PIL import Image

    with pytest.raises(InputError, match="images= must be a list .*got an Image"):
        model.embed(images=Image.new("RGB", (8, 8)))
    with pytest.raises(InputError, match="images= got one 3-D array"):
        model.embed(images=IMAGE)
    with pytest.raises(InputError, match=r"audio= got one \(waveform, sample_rate\) pair"):
        model.embed(audio=CLIP)
    # a 4-D batch of images is still a batch
    assert model.embed(images=np.stack([IMAGE, IMAGE])).shape[0] == 2


@pytest.mark.parametrize("kind", ["dict", "set", "dict keys"])
@pytest.mark.parametrize("argument", ["text", "images", "audio", "labels"])
def test_dicts_and_sets_are_refused_for_every_list_argument(model, argument, kind):
    item = {"text": "a cat", "images": IMAGE, "audio": CLIP, "labels": "cat"}[argument]
    if kind == "dict":
        value, why = {"a": item} if argument != "labels" else {item: 1}, "its keys would be taken as the items"
    elif kind == "set":
        value, why = {"a", "b"} if argument in ("text", "labels") else {1, 2}, "its order is arbitrary"
    else:
        value, why = {"a": 1, "b": 2}.keys(), "its order is arbitrary"
    call = model.classify if argument == "labels" else model.embed
    kwargs = {"images": [IMAGE], "labels": value} if argument == "labels" else {argument: value}
    with pytest.raises(InputError, match=f"{argument}= must be a .*list .*{why}"):
        call(**kwargs)


@pytest.mark.parametrize("prompt", [[None], ["a", None], ("a", 3)])
def test_prompts_must_be_strings(model, prompt):
    media = {"images": [IMAGE] * len(prompt)}
    with pytest.raises(InputError, match=r"prompt\[\d\] must be a str \(use '' for no prompt\)"):
        model.caption(**media, prompt=prompt, max_new_tokens=2)
    with pytest.raises(InputError, match=r"prompt\[\d\] must be a str"):
        model.caption(prompt=prompt, max_new_tokens=2)


def test_texts_must_be_strings(model):
    with pytest.raises(InputError, match=r"text\[1\] must be a str, got a NoneType"):
        model.embed(text=["a", None])
    with pytest.raises(InputError, match=r"text\[0\] must be a str"):
        model.generate_image(text=[None], num_inference_steps=1)


# ---- zero-shot labels ----


@pytest.mark.parametrize("labels", [["cat", "cat", "dog"], ["cat", "dog", " cat "], ("a", "b", "a  b", "a b")])
def test_duplicate_zero_shot_labels_are_refused(model, labels):
    with pytest.raises(InputError, match="labels= names .* twice .*each class must appear once"):
        model.classify(images=[IMAGE], labels=labels)


def test_distinct_labels_still_classify(model):
    result = model.classify(images=[IMAGE], labels=("cat", "dog", "Cat"))
    assert result.classes == ["cat", "dog", "Cat"] and result.probs.shape == (1, 3)


# ---- numbers: counts, scales, temperatures, seeds ----


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"max_new_tokens": "3"}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"num_beams": 2.0}, "num_beams"),
        ({"top_k": True}, "top_k"),
        ({"do_sample": True, "temperature": float("nan")}, "temperature"),
        ({"do_sample": True, "temperature": float("inf")}, "temperature"),
        ({"do_sample": True, "temperature": "0.5"}, "temperature"),
        ({"do_sample": True, "top_p": float("nan")}, "top_p"),
        ({"do_sample": "yes"}, "do_sample"),
        ({"length_penalty": float("inf"), "num_beams": 2}, "length_penalty"),
        ({"do_sample": True, "seed": 2**64}, "seed"),
        ({"do_sample": True, "seed": -(2**63) - 1}, "seed"),
        ({"do_sample": True, "seed": 10**5000}, "seed"),
        ({"do_sample": True, "seed": 1.5}, "seed"),
        ({"temprature": 0.5}, "temprature"),
    ],
)
def test_bad_generation_options_are_input_errors_naming_them_before_any_media_is_read(model, options, name):
    with pytest.raises(InputError, match=f"{name}") as e:
        model.caption(images=["/no/such/image.png"], **options)  # the option fails first, not the missing file
    assert "/no/such/image.png" not in str(e.value) and len(str(e.value)) < 400


def test_a_misspelled_generation_option_suggests_the_right_one(model):
    with pytest.raises(InputError, match="unknown generation option 'temprature' \\(did you mean 'temperature'\\?\\)"):
        model.caption(images=[IMAGE], temprature=0.5)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"num_images": 2.5}, "num_images"),
        ({"num_images": "2"}, "num_images"),
        ({"num_inference_steps": 1.0}, "num_inference_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"image_size": 16.0}, "image_size"),
        ({"guidance_scale": 1e30}, "guidance_scale"),
        ({"guidance_scale": 101.0}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": float("inf")}, "guidance_scale"),
        ({"guidance_scale": "3"}, "guidance_scale"),
        ({"seed": 2**64}, "seed"),
        ({"seed": np.float64(3)}, "seed"),
    ],
)
def test_bad_image_generation_options_are_input_errors_before_any_media_is_read(model, options, name):
    with pytest.raises(InputError, match=f"^{name} must be") as e:
        model.generate_image(images=["/no/such/image.png"], **options)
    if name == "guidance_scale":
        assert "at most 100" in str(e.value)


def test_guidance_up_to_the_bound_still_samples(model):
    from mmfm.heads.image_gen import MAX_GUIDANCE_SCALE

    assert MAX_GUIDANCE_SCALE == 100
    images = model.generate_image(text=["a"], guidance_scale=MAX_GUIDANCE_SCALE, num_inference_steps=1, seed=0)
    assert len(images) == 1


def test_numpy_integers_are_accepted_as_seeds_and_counts(model):
    kwargs = {"do_sample": True, "max_new_tokens": 3}
    caption = model.caption(images=[IMAGE], seed=3, **kwargs)
    assert model.caption(images=[IMAGE], seed=np.int64(3), **kwargs) == caption
    assert model.caption(images=[IMAGE], seed=np.uint64(3), max_new_tokens=np.int32(3), do_sample=np.True_) == caption
    options = {"num_inference_steps": 1, "num_images": 2}
    images = model.generate_image(text=["a"], seed=2, **options)
    same = model.generate_image(text=["a"], seed=np.int32(2), **{k: np.int64(v) for k, v in options.items()})
    assert [np.asarray(i).tolist() for i in images] == [np.asarray(i).tolist() for i in same]
    assert len(model.embed(text=["a", "b", "c"], batch_size=np.int64(2))) == 3


def test_the_full_64_bit_seed_range_is_accepted(model):
    for seed in (0, -1, 2**64 - 1, -(2**63)):
        assert len(model.caption(images=[IMAGE], do_sample=True, seed=seed, max_new_tokens=2)) == 1


@pytest.mark.parametrize("k", [-1, 0, 1.5, "2", None])
def test_classification_top_takes_a_whole_number_of_at_least_one(model, k):
    result = model.classify(images=[IMAGE], labels=["cat", "dog"])
    with pytest.raises(InputError, match="^k must be a whole number"):
        result.top(k)
    assert len(result.top(np.int64(5))[0]) == 2


def test_classification_above_refuses_a_nan_threshold(model):
    result = model.classify(images=[IMAGE], labels=["cat", "dog"])
    with pytest.raises(InputError, match="threshold must be a finite number"):
        result.above(float("nan"))
