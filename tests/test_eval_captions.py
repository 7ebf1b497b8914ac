"""Caption metrics against the COCO caption evaluation (pycocoevalcap): its Java PTB tokenizer and its scorers."""

from __future__ import annotations

import random

import pytest

from mmfm.errors import InputError
from mmfm.eval.captions import bleu, caption_metrics, cider_d, exact_match, ptb_tokenize, rouge_l

WORDS = (
    "a an the man woman dog dogs cat bird people kids child boy girl bus train car street grass field beach table "
    "pizza plate bike kite frisbee ball snow water sky tree building sign red blue green white black small large "
    "two three several is are sits sitting stands standing riding holding eating playing next to on in of with "
    "near at under over behind front top while and its their some"
).split()
CAPITALS = "A The Two Three Man Woman Dog People London Paris New York Street Avenue Park Their It".split()
SPECIAL = (
    "isn't don't can't won't it's man's dogs' they're we've I'll I'd cannot gonna wanna 'tis o'clock rock'n'roll "
    "y'all '90s 1990's ma'am Dr. Mr. Mrs. St. Mt. U.S. U.K. a.m. p.m. e.g. i.e. etc. Inc. Co. Jr. vs. No. Jan. "
    "Calif. hot-dog T-shirt 3-year-old well-known x-ray $5 $5.50 1,000 3.14 10:30 50% 5/6/2012 1/2 3/4 24/7 "
    "red/blue & AT&T #1 #tag @user e-mail www.example.com http://example.com/a?b=1 a@b.com 2nd 10th 5km 3D 4x4 "
    "( ) [ ] { } \" ' `` '' -- - ... … — – “ ” ‘ ’ ½ ° * + = < > | ~ ^ café naïve :) ;-) a. dog.The"
).split()
ATTACHED = [".", ",", "!", "?", ";", ":", "...", "'s", "n't", "?!", "!!", ")", '"', "'"]
TRICKY = [
    "",
    "A man's dog isn't running. They're \"happy\" here.",
    "Dr. Smith and Mr. Jones went to the U.S. The end.",
    "It costs $5.50 or 1,000 dollars & more - really -- yes.",
    "a cat (black) sits on a mat... and waits!",
    "'Hello,' she said `quoted' ``double''",
    "they do etc.",
    "A dog runs past No. 5 and No. 6 Inc.",
    "On a. The x",
    "ok.. wow.... end. . . .",
    "   leading and    many spaces  ",
]


def caption(rng: random.Random) -> str:
    """A caption-like line mixing words, capitals, contractions, abbreviations, numbers, quotes and punctuation."""
    parts: list[str] = []
    for _ in range(rng.randint(0, 16)):
        r = rng.random()
        if r < 0.55:
            parts.append(rng.choice(WORDS))
        elif r < 0.65:
            parts.append(rng.choice(CAPITALS))
        elif r < 0.85:
            parts.append(rng.choice(SPECIAL))
        elif parts:
            parts[-1] += rng.choice(ATTACHED)
        else:
            parts.append(rng.choice(ATTACHED))
        if parts and rng.random() < 0.05:
            parts[-1] = "(" + parts[-1]
    text = " ".join(parts)
    if text and rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.4:
        text += rng.choice([".", " .", "!", "?", "", "  "])
    return text


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[list[str]]]:
    """300 seeded items with 1-5 references: empty predictions, copies of a reference, repeated words."""
    rng = random.Random(0)
    predictions, references = [], []
    for _ in range(300):
        refs = [caption(rng) for _ in range(rng.randint(1, 5))]
        r = rng.random()
        if r < 0.05:
            prediction = ""
        elif r < 0.15:
            prediction = refs[0]
        elif r < 0.2:
            prediction = " ".join([rng.choice(["dog", "a"])] * rng.randint(1, 8))
        else:
            prediction = caption(rng)
        predictions.append(prediction)
        references.append(refs)
    predictions[: len(TRICKY)] = TRICKY
    return predictions, references


def coco_tokenize(texts: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer (the Java tokenizer) on the texts, in order."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokens = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    return [tokens[i][0] for i in range(len(texts))]


def coco_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """pycocoevalcap's Bleu(4), Cider() and Rouge() on already tokenised text."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = dict(enumerate(references))
    res = {i: [p] for i, p in enumerate(predictions)}
    scores = dict(zip(["bleu_1", "bleu_2", "bleu_3", "bleu_4"], Bleu(4).compute_score(gts, res, verbose=0)[0]))
    scores["cider_d"] = float(Cider().compute_score(gts, res)[0])
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    return scores


@pytest.fixture(scope="module")
def coco_tokens(corpus) -> tuple[list[str], list[list[str]]]:
    """The corpus tokenised by the Java tokenizer: predictions as one stream, references as another (as COCO)."""
    predictions, references = corpus
    flat = iter(coco_tokenize([r for refs in references for r in refs]))
    return coco_tokenize(predictions), [[next(flat) for _ in refs] for refs in references]


def test_ptb_tokenize_equals_the_java_tokenizer(corpus, coco_tokens):
    predictions, references = corpus
    flat_refs = [r for refs in references for r in refs]
    ours = ptb_tokenize(predictions) + ptb_tokenize(flat_refs)
    theirs = coco_tokens[0] + [r for refs in coco_tokens[1] for r in refs]
    mismatches = [(text, a, b) for text, a, b in zip(predictions + flat_refs, ours, theirs) if a != b]
    assert not mismatches, f"{len(mismatches)} of {len(ours)} differ, e.g. {mismatches[:3]}"
    assert ptb_tokenize(["A man's dog (black) isn't here..."]) == ["a man 's dog -lrb- black -rrb- is n't here"]


def test_scorers_equal_pycocoevalcap_on_the_same_tokens(coco_tokens):
    predictions, references = coco_tokens
    expected = coco_scores(predictions, references)
    got = dict(zip(["bleu_1", "bleu_2", "bleu_3", "bleu_4"], bleu(predictions, references, tokenize=False)))
    got["cider_d"] = cider_d(predictions, references, tokenize=False)
    got["rouge_l"] = rouge_l(predictions, references, tokenize=False)
    assert got == pytest.approx(expected, abs=1e-6, rel=0)
    assert 0 < expected["bleu_4"] < expected["bleu_1"] < 1 and expected["cider_d"] > 0


def test_caption_metrics_on_raw_text_equal_the_coco_pipeline(corpus, coco_tokens):
    predictions, references = corpus
    got = caption_metrics(predictions, references)
    assert set(got) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider_d", "rouge_l", "exact_match"}
    exact = got.pop("exact_match")
    assert got == pytest.approx(coco_scores(*coco_tokens), abs=1e-6, rel=0)
    copies = sum(p.strip() in [r.strip() for r in refs] for p, refs in zip(predictions, references))
    assert exact == copies / len(predictions) and exact > 0


def test_scores_reward_agreement():
    refs = [["a dog runs on the grass", "a brown dog running on grass"], ["two cats sleep on a red sofa"]]
    good = caption_metrics(["A dog runs on the grass.", "Two cats sleep on a sofa."], refs)
    bad = caption_metrics(["a red bus in the city", "a plate of pizza"], refs)
    assert all(good[k] > bad[k] for k in ("bleu_1", "bleu_2", "cider_d", "rouge_l"))
    assert good["exact_match"] == 0.0 and bad["exact_match"] == 0.0


def test_empty_prediction_scores_zero_and_a_string_is_one_reference():
    scores = caption_metrics(["", "a dog"], ["a cat on a mat", ["a dog", "the dog"]])
    assert scores["exact_match"] == 0.5
    assert rouge_l([""], ["a cat on a mat"]) == 0.0
    assert cider_d(["", "x y z"], ["a cat on a mat", "a dog"]) == 0.0
    assert bleu([""], ["a cat"])[0] < 1e-6
    assert exact_match(["  a dog "], [["a cat", "a dog"]]) == 1.0


@pytest.mark.parametrize(
    "predictions, references, message",
    [
        (["a", "b"], [["a"]], "differ in length"),
        ([], [], "no predictions"),
        (["a"], [[]], r"references\[0\] is empty"),
        (["a", "b"], ["a", []], r"references\[1\] is empty"),
        ([3], [["a"]], r"predictions\[0\] is int"),
        (["a"], [["a", 3]], r"references\[0\] holds int"),
    ],
)
def test_bad_input_raises_input_error(predictions, references, message):
    for metric in (caption_metrics, bleu, cider_d, rouge_l, exact_match):
        with pytest.raises(InputError, match=message):
            metric(predictions, references)
