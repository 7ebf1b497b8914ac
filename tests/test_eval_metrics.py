"""Retrieval, classification, multi-label, QA and generation metrics equal plain references and refuse bad input."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

from mmfm.errors import InputError
from mmfm.eval.classification import (
    classification_metrics,
    confusion_matrix,
    per_class_accuracy,
    top_k_accuracy,
    zero_shot_weights,
)
from mmfm.eval.generation import (
    clip_score,
    diversity,
    diversity_by_label,
    generation_metrics,
    judge_verdicts,
    judged_accuracy,
)
from mmfm.eval.multilabel import average_precision, mean_average_precision, multilabel_metrics
from mmfm.eval.qa import accuracy_by_family, is_correct, normalize_answer, qa_accuracy
from mmfm.eval.retrieval import label_recall, retrieval_metrics

# ---- retrieval ----


def _brute_ranks(scores: list[float], right: list[bool]) -> list[float]:
    """The 1-based rank of the first right candidate under every tie-break: each order of the candidates, applied
    before a stable sort by score, is one equally likely way of breaking the ties."""
    ranks = []
    for tie_break in itertools.permutations(range(len(scores))):
        order = sorted(tie_break, key=lambda j: -scores[j])
        ranks.append(next((pos + 1 for pos, j in enumerate(order) if right[j]), math.inf))
    return ranks


def _brute_recalls(sims: torch.Tensor, right, ks, direction: str) -> dict[str, float]:
    """R@k and median rank averaged over every tie-break, query by query (see `_brute_ranks`)."""
    per_query = [_brute_ranks(sims[q].tolist(), [right(q, j) for j in range(sims.shape[1])]) for q in range(len(sims))]
    hits = {f"r{k}_{direction}": statistics.mean(statistics.mean(r <= k for r in q) for q in per_query) for k in ks}
    return hits | {f"median_rank_{direction}": statistics.median(statistics.mean(ranks) for ranks in per_query)}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_retrieval_recall_and_median_rank_average_every_tie_break(seed):
    gen = torch.Generator().manual_seed(seed)
    media = torch.randint(-1, 2, (5, 2), generator=gen).float()  # few distinct scores: many ties
    owner = torch.cat([torch.arange(5), torch.randint(0, 5, (2,), generator=gen)])  # two items have two texts
    owner = owner[torch.randperm(7, generator=gen)]
    texts = torch.randint(-1, 2, (7, 2), generator=gen).float()
    sims = media @ texts.T

    metrics = retrieval_metrics(media, texts, owner, ks=(1, 2, 5), names=("image", "text"))

    expected = _brute_recalls(sims, lambda q, j: owner[j] == q, (1, 2, 5), "image_to_text")
    expected |= _brute_recalls(sims.T, lambda q, j: owner[q] == j, (1, 2, 5), "text_to_image")
    assert metrics == pytest.approx(expected, abs=1e-9)
    assert list(metrics) == [
        f"{key}_{d}" for d in ("image_to_text", "text_to_image") for key in ("r1", "r2", "r5", "median_rank")
    ]


def test_retrieval_of_perfect_pairs_and_constant_embeddings_at_chance():
    eye = torch.eye(6)
    perfect = retrieval_metrics(eye, eye, torch.arange(6), ks=(1,), names=("audio", "text"))
    assert perfect == {
        "r1_audio_to_text": 1,
        "median_rank_audio_to_text": 1,
        "r1_text_to_audio": 1,
        "median_rank_text_to_audio": 1,
    }
    # every score ties: a random order of the candidates, neither the best nor the worst case
    same = retrieval_metrics(torch.ones(4, 3), torch.ones(4, 3), torch.arange(4), ks=(1, 2, 4))
    for d in ("image_to_text", "text_to_image"):
        assert same[f"r1_{d}"] == pytest.approx(1 / 4) and same[f"r2_{d}"] == pytest.approx(2 / 4)
        assert same[f"r4_{d}"] == 1 and same[f"median_rank_{d}"] == pytest.approx(2.5)
    # 12 texts, 3 per image: the chance that one of an image's 3 texts is among k of 12 random places
    owner = torch.arange(4).repeat(3)
    shared = retrieval_metrics(torch.ones(4, 3), torch.ones(12, 3), owner, ks=(1, 5, 10))
    assert shared["r1_image_to_text"] == pytest.approx(3 / 12)
    assert shared["r5_image_to_text"] == pytest.approx(1 - math.comb(9, 5) / math.comb(12, 5))
    assert shared["r10_image_to_text"] == 1 and shared["median_rank_image_to_text"] == pytest.approx(1 + 9 / 4)
    assert shared["r1_text_to_image"] == pytest.approx(1 / 4)


def test_tied_paired_texts_are_not_counted_against_the_query():
    # the digits case: images of one digit share identical captions, so an image's own caption ties with the
    # same caption of every other image of its digit; one of the 1 + 3 tied candidates is drawn first
    media = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
    texts = media.clone()  # text i is image i's caption, identical within a digit
    metrics = retrieval_metrics(media, texts, torch.arange(8), ks=(1, 4, 5))
    assert metrics["r1_image_to_text"] == pytest.approx(1 / 4)
    assert metrics["r4_image_to_text"] == 1 and metrics["r5_image_to_text"] == 1
    assert metrics["median_rank_image_to_text"] == pytest.approx(2.5)
    assert label_recall(media, texts, [0] * 4 + [1] * 4, [0] * 4 + [1] * 4, ks=(1,)) == {
        "label_r1_image_to_text": 1,
        "label_r1_text_to_image": 1,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_recall_averages_every_tie_break(seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randint(-1, 2, (6, 2), generator=gen).float(), torch.randint(-1, 2, (7, 2), generator=gen).float()
    labels_a, labels_b = torch.randint(0, 3, (6,), generator=gen), torch.randint(0, 4, (7,), generator=gen)
    sims = a @ b.T

    metrics = label_recall(a, b, labels_a, labels_b, ks=(1, 3, 5), names=("image", "text"))

    forward = _brute_recalls(sims, lambda q, j: labels_b[j] == labels_a[q], (1, 3, 5), "image_to_text")
    backward = _brute_recalls(sims.T, lambda q, j: labels_a[j] == labels_b[q], (1, 3, 5), "text_to_image")
    expected = {f"label_{k}": v for k, v in (forward | backward).items() if not k.startswith("median")}
    assert metrics == pytest.approx(expected, abs=1e-9)


def test_retrieval_bad_input_is_named():
    media, texts = torch.randn(3, 4), torch.randn(4, 4)
    with pytest.raises(InputError, match="owner holds 3 indices, but 4 items"):
        retrieval_metrics(media, texts, torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match=r"owner\[3\] is 3, outside the 3 image items"):
        retrieval_metrics(media, texts, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(InputError, match="image 2 has no text"):
        retrieval_metrics(media, texts, torch.tensor([0, 1, 1, 0]))
    with pytest.raises(InputError, match="image embeddings are 4 wide and the text embeddings 5"):
        retrieval_metrics(media, torch.randn(4, 5), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(InputError, match="the image embeddings must have shape"):
        retrieval_metrics(torch.randn(0, 4), texts, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(InputError, match="non-finite"):
        retrieval_metrics(media, texts.index_fill(0, torch.tensor([1]), float("nan")), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(InputError, match=r"ks\[1\] must be a whole number >= 1, got 0"):
        retrieval_metrics(media, texts, torch.tensor([0, 1, 2, 0]), ks=(1, 0))
    with pytest.raises(InputError, match="labels_b must be 4 integer labels"):
        label_recall(media, texts, [0, 1, 2], [0.5, 1, 2, 3])


# ---- classification ----

LOGITS = torch.tensor(
    [
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top 1
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 0: rank 6 -> missed by top 5
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 2: rank 3
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 3: ties with all five others -> missed by top 5
        [0.2, 0.1, 0.9, 0.0, 0.0, 0.0],  # label 2: top 1
    ]
)
LABELS = torch.tensor([0, 0, 2, 3, 2])
CLASSES = ["zero", "one", "two", "three", "four", "five"]


def test_top_k_accuracy_equals_a_hand_count():
    assert top_k_accuracy(LOGITS, LABELS) == {"top1": pytest.approx(2 / 5), "top5": pytest.approx(3 / 5)}
    assert top_k_accuracy(LOGITS, LABELS, ks=(3, 1, 10)) == {"top1": pytest.approx(0.4), "top3": pytest.approx(0.6)}


def test_confusion_matrix_and_per_class_accuracy():
    gen = torch.Generator().manual_seed(0)
    labels, predicted = torch.randint(0, 7, (200,), generator=gen), torch.randint(0, 7, (200,), generator=gen)
    expected = sklearn_confusion_matrix(labels.numpy(), predicted.numpy(), labels=range(7))
    np.testing.assert_array_equal(confusion_matrix(predicted, labels, 7).numpy(), expected)

    predicted = LOGITS.argmax(dim=1)  # [0, 5, 0, 0, 2]
    assert per_class_accuracy(predicted, LABELS, CLASSES) == {"zero": 0.5, "two": 0.5, "three": 0.0}
    metrics = classification_metrics(LOGITS, LABELS, CLASSES)
    assert metrics == pytest.approx(
        {"top1": 0.4, "top5": 0.6, "accuracy/zero": 0.5, "accuracy/two": 0.5, "accuracy/three": 0.0}
    )


def test_classification_bad_input_is_named():
    with pytest.raises(InputError, match="labels holds 4 indices, but 5 items"):
        top_k_accuracy(LOGITS, LABELS[:4])
    with pytest.raises(InputError, match=r"labels\[1\] is 6, outside the 6 classes"):
        top_k_accuracy(LOGITS, torch.tensor([0, 6, 0, 0, 0]))
    with pytest.raises(InputError, match="labels must hold integer indices"):
        top_k_accuracy(LOGITS, LABELS.float())
    with pytest.raises(InputError, match=r"ks\[0\] must be a whole number >= 1, got 0"):
        top_k_accuracy(LOGITS, LABELS, ks=(0,))
    with pytest.raises(InputError, match="logits must be a 2-D"):
        top_k_accuracy(LOGITS[0], LABELS)
    with pytest.raises(InputError, match=r"logits must have shape \('any', 4\)"):
        classification_metrics(LOGITS, LABELS, CLASSES[:4])
    with pytest.raises(InputError, match="predicted holds 2 indices, but 3"):
        confusion_matrix([0, 1], [0, 1, 1], 2)
    with pytest.raises(InputError, match="labels must be a non-empty"):
        per_class_accuracy([], [], CLASSES)


def test_zero_shot_weights_average_unit_embeddings_per_class():
    table = {"a cat": [3.0, 0.0], "the cat": [0.0, 1.0], "a dog": [-2.0, 0.0], "the dog": [-1.0, 0.0]}
    weights = zero_shot_weights(
        lambda texts: torch.tensor([table[t] for t in texts]), ["cat", "dog"], ["a {}", "the {}"]
    )
    torch.testing.assert_close(weights, torch.tensor([[0.5**0.5, 0.5**0.5], [-1.0, 0.0]]))
    with pytest.raises(InputError, match=r'templates\[1\] .* has no "\{\}"'):
        zero_shot_weights(lambda texts: torch.ones(len(texts), 2), ["cat"], ["a {}", "a photo"])
    with pytest.raises(InputError, match="class_names is empty"):
        zero_shot_weights(lambda texts: torch.ones(len(texts), 2), [], ["a {}"])
    with pytest.raises(InputError, match=r"embed_text must return a \(2, E\) float tensor"):
        zero_shot_weights(lambda texts: torch.ones(1, 2), ["cat", "dog"], ["a {}"])


# ---- multi-label ----


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_equals_scikit_learn_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, (60, 7)).astype(np.float32)  # few distinct values: many ties
    scores[:, :3] = rng.normal(size=(60, 3))
    targets = rng.random((60, 7)) < 0.3
    targets[0] = True  # every class has a positive

    per_class = average_precision(torch.from_numpy(scores), torch.from_numpy(targets))

    expected = average_precision_score(targets, scores, average=None)
    np.testing.assert_allclose(per_class.numpy(), expected, rtol=0, atol=1e-6)
    macro = average_precision_score(targets, scores, average="macro")
    assert mean_average_precision(
        torch.from_numpy(scores), torch.from_numpy(targets.astype(np.int64))
    ) == pytest.approx(macro, abs=1e-6)


def test_a_class_without_positives_is_named_unless_skipped():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4], [0.3, 0.7, 0.6]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
    with pytest.raises(InputError, match=r"class 2 \('bird'\) has no positive item .* skip_empty=True"):
        average_precision(scores, targets, ["cat", "dog", "bird"])
    ap = average_precision(scores, targets, skip_empty=True)
    assert ap[:2].tolist() == pytest.approx([1.0, 1.0]) and ap[2].isnan()
    assert multilabel_metrics(scores, targets, ["cat", "dog", "bird"], skip_empty=True) == {
        "map": 1.0,
        "ap/cat": 1.0,
        "ap/dog": 1.0,
    }
    with pytest.raises(InputError, match=r"targets\[1, 2\] \(class 2\) is 2: targets are 0 or 1"):
        average_precision(scores, targets + torch.tensor([[0, 0, 1], [0, 0, 2], [0, 0, 0]]))
    with pytest.raises(InputError, match=r"targets must have the shape of scores \(3, 3\), got \(3, 2\)"):
        average_precision(scores, targets[:, :2])
    with pytest.raises(InputError, match="no positive item at all"):
        average_precision(scores, torch.zeros(3, 3), skip_empty=True)


# ---- QA ----


def test_answers_are_normalised_for_case_punctuation_and_number_words():
    assert normalize_answer("It's a SEVEN, or 7!") == ["it", "s", "a", "7", "or", "7"]
    assert normalize_answer("three + four = seven.") == ["3", "+", "4", "=", "7"]
    assert is_correct("Twelve.", ["eleven", "12"])
    assert not is_correct("It is twelve.", "12")
    assert is_correct("I think it is twelve.", "It is 12.", answer="12")


def test_qa_accuracy_per_family():
    replies = ["It is a seven.", "Paris, I think", "two", "Lyon"]
    references = ["it is a 7", "Paris.", "2", ["Paris", "paris, france"]]
    metrics = qa_accuracy(
        replies, references, answers=[None, "paris", None, None], families=["digit", "capital", "digit", "capital"]
    )
    assert metrics == {"accuracy": 0.75, "accuracy/capital": 0.5, "accuracy/digit": 1.0}
    assert qa_accuracy(replies, references) == {"accuracy": 0.5}  # "Paris, I think" is not the whole reference
    assert accuracy_by_family([True, False, True], ["b", "a", "b"]) == {
        "accuracy": 2 / 3,
        "accuracy/a": 0.0,
        "accuracy/b": 1.0,
    }


def test_qa_bad_input_is_named():
    with pytest.raises(InputError, match="replies and references differ in length: 2 replies, 1 references"):
        qa_accuracy(["a", "b"], ["a"])
    with pytest.raises(InputError, match="no replies: nothing to score"):
        qa_accuracy([], [])
    with pytest.raises(InputError, match=r"references\[1\] is empty"):
        qa_accuracy(["a", "b"], ["a", []])
    with pytest.raises(InputError, match="replies and families differ in length"):
        qa_accuracy(["a", "b"], ["a", "b"], families=["x"])
    with pytest.raises(InputError, match=r"answers\[0\] is int 7"):
        qa_accuracy(["a"], ["a"], answers=[7])


# ---- generation ----


def _grey(value: int, size: int = 4) -> Image.Image:
    return Image.new("L", (size, size), value)


def test_judged_accuracy_with_a_toy_judge():
    images = [_grey(0), _grey(255), _grey(255), _grey(0)]
    judge = lambda ims: [int(im.getpixel((0, 0)) > 127) for im in ims]  # noqa: E731 - "is it bright?"
    assert judge_verdicts(images, ["0", 1, 0, 0], judge) == [True, True, False, True]
    assert judged_accuracy(images, [0, 1, 0, 0], judge) == 0.75
    with pytest.raises(InputError, match="images and targets differ in length"):
        judged_accuracy(images, [0, 1], judge)
    with pytest.raises(InputError, match="the judge gave 1 readings for 4 images"):
        judged_accuracy(images, [0, 1, 0, 0], lambda ims: [0])


def test_diversity_is_the_mean_pairwise_rms_distance():
    black, white = _grey(0), _grey(255)
    assert diversity([black, black, black]) == 0
    assert diversity([black, white]) == pytest.approx(1.0)
    assert diversity([black, white, white]) == pytest.approx(2 / 3)
    assert diversity([black, Image.new("RGB", (4, 4), (128, 128, 128))]) == pytest.approx(128 / 255)
    with pytest.raises(InputError, match="at least two images"):
        diversity([black])
    with pytest.raises(InputError, match="one size"):
        diversity([black, _grey(0, 8)])
    with pytest.raises(InputError, match=r"images\[1\] is a ndarray, not a PIL image"):
        diversity([black, np.zeros((4, 4))])


def test_generation_metrics_compare_images_within_their_label_only():
    black, white = _grey(0), _grey(255)
    images, labels = [black, white, black, black, white], ["a", "a", "b", "b", "c"]
    # label a: one pair 1.0 apart; b: one pair 0 apart; c: a single image, not compared with anything
    assert diversity_by_label(images, labels) == pytest.approx(0.5)
    assert diversity_by_label(images[:3], ["a", "b", "c"]) is None
    judge = lambda ims: ["a" if im.getpixel((0, 0)) < 128 else "c" for im in ims]  # noqa: E731
    metrics, verdicts = generation_metrics(images, labels, judge)
    assert verdicts == [True, False, False, False, True]
    assert metrics == {"judged_accuracy": pytest.approx(2 / 5), "diversity": pytest.approx(0.5)}
    assert generation_metrics(images[:3], ["a", "b", "c"]) == ({}, None)
    with pytest.raises(InputError, match="images and labels differ in length"):
        diversity_by_label(images, labels[:4])


def test_clip_score_on_known_vectors():
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    texts = torch.tensor([[3.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])  # cos 1, 1/sqrt(2), -1 (clipped to 0)
    assert clip_score(images, texts) == pytest.approx(2.5 * (1 + 0.5**0.5 + 0) / 3)
    assert clip_score(images, texts, w=1.0) == pytest.approx((1 + 0.5**0.5) / 3)
    with pytest.raises(InputError, match=r"text_embeddings must have shape \(3, 2\)"):
        clip_score(images, texts[:2])
    with pytest.raises(InputError, match="w must be > 0"):
        clip_score(images, texts, w=0)
