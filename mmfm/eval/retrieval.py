"""Retrieval metrics: recall at k and median rank, media -> text and text -> media, over embeddings.

Scores are dot products of the embeddings (pass unit vectors, as `model.embed` returns, for cosine
similarity). A media item may have several texts (COCO has five captions per image): `owner[t]` is the index
of the media item text t belongs to.

- media -> text: an image's rank is the best rank among its own texts; it is a hit at k when one of its texts
  is among the k best-scored texts.
- text -> media: a text's rank is the rank of the media item it belongs to.

Ranks are 1-based. Ties are broken at random, and every number is its expectation over that random order (what
an arbitrary tie-break gives on average), so tied scores count neither for nor against the query. For a query
with `a` wrong candidates scored strictly above its best right one, and a tied group of `r` right and `w` wrong
candidates at that score:

- P(hit at k) = 0 when k <= a, else 1 - C(w, m) / C(w + r, m) with m = k - a (1 when m > w): the chance that one
  of the first m places of the tied group holds a right candidate;
- expected rank = a + 1 + w / (r + 1): on average w / (r + 1) wrong candidates of the group precede the first right
  one.

R@k is the mean of P(hit at k) over the queries, and the median rank the median of their expected ranks (the mean
of the two middle ones for an even count). Constant embeddings are thus at chance level: R@1 = 1/K and median
rank (K + 1) / 2 over K candidates with one right answer each.

`label_recall` is the looser variant `mmfm eval` reported before: a hit is any neighbour with the query's
label (digits shares each caption among many images of one digit, so "the same digit" is what a right retrieval
means there). Its ties are counted the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmfm.errors import InputError
from mmfm.eval.checks import class_indices, cutoffs, matrix

CHUNK = 1024  # queries scored at once: a (CHUNK, candidates) block of similarities at a time


def retrieval_metrics(
    media: Tensor,
    texts: Tensor,
    owner: Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    names: tuple[str, str] = ("image", "text"),
) -> dict[str, float]:
    """R@k and median rank in both directions, where a hit is an item's own pair.

    Tied scores are broken at random and the numbers are their expectations (see the module docstring).

    Args:
        media: (M, E) media embeddings.
        texts: (T, E) text embeddings.
        owner: (T,) the index of the media item each text belongs to; every media item needs a text.
        ks: the recall cut-offs.
        names: what the two sides are called in the keys.

    Returns:
        {"r1_image_to_text", "r5_...", "r10_...", "median_rank_image_to_text", and the same "..._text_to_image"}.

    Raises:
        InputError: embeddings that are not 2-D, empty, of different widths or not finite; an owner outside
            [0, M) or of the wrong length; a media item without texts; a cut-off below 1.
    """
    media, texts = _embeddings(media, texts, names)
    owner = class_indices("owner", owner, len(media), len(texts), f"{names[0]} items")
    ks = cutoffs(ks)
    counts = torch.bincount(owner, minlength=len(media))
    if not bool(counts.all()):
        raise InputError(f"{names[0]} {int((counts == 0).nonzero()[0])} has no {names[1]} in owner: each needs one")
    owner = owner.to(media.device)
    rows = torch.arange(len(media), device=media.device)
    forward = _placements(media, texts, lambda q: owner[None, :] == rows[q, None])
    backward = _placements(texts, media, lambda q: rows[None, :] == owner[q, None])
    metrics = {}
    for direction, placed in _directions(names, forward, backward):
        metrics |= {f"r{k}_{direction}": float(_hit_chance(placed, k).mean()) for k in ks}
        metrics[f"median_rank_{direction}"] = float(_expected_rank(placed).quantile(0.5))
    return metrics


def label_recall(
    a: Tensor,
    b: Tensor,
    labels_a: Tensor | Sequence[int],
    labels_b: Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    names: tuple[str, str] = ("image", "text"),
) -> dict[str, float]:
    """R@k in both directions where a hit is any neighbour that shares the query's label.

    Ties are counted as the module docstring says; a query whose label no candidate has is a miss at every k.

    Args:
        a: (N, E) embeddings of one side.
        b: (K, E) embeddings of the other side.
        labels_a: (N,) integer labels of `a`.
        labels_b: (K,) integer labels of `b`.
        ks: the recall cut-offs.
        names: what `a` and `b` are called in the keys.

    Returns:
        {"label_r1_image_to_text", ..., "label_r1_text_to_image", ...}.
    """
    a, b = _embeddings(a, b, names)
    labels_a = _labels("labels_a", labels_a, len(a)).to(a.device)
    labels_b = _labels("labels_b", labels_b, len(b)).to(a.device)
    ks = cutoffs(ks)
    forward = _placements(a, b, lambda q: labels_b[None, :] == labels_a[q, None])
    backward = _placements(b, a, lambda q: labels_a[None, :] == labels_b[q, None])
    return {
        f"label_r{k}_{direction}": float(_hit_chance(placed, k).mean())
        for direction, placed in _directions(names, forward, backward)
        for k in ks
    }


def _embeddings(a: Tensor, b: Tensor, names: tuple[str, str]) -> tuple[Tensor, Tensor]:
    a, b = matrix(f"the {names[0]} embeddings", a), matrix(f"the {names[1]} embeddings", b)
    if a.shape[1] != b.shape[1]:
        raise InputError(
            f"the {names[0]} embeddings are {a.shape[1]} wide and the {names[1]} embeddings {b.shape[1]}: "
            "both sides must be embedded into one space"
        )
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(a.device, dtype)


def _labels(name: str, labels: Tensor | Sequence[int], length: int) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dim() != 1 or len(labels) != length:
        raise InputError(
            f"{name} must be {length} integer labels, one per embedding, "
            f"got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    return labels


def _placements(queries: Tensor, candidates: Tensor, right) -> Tensor:
    """(Q, 3) per query: the wrong candidates scored strictly above its best right one (a), and the right (r) and
    wrong (w) candidates tied at that best score; r = 0 when the query has no right candidate.

    `right(rows)` gives the (len(rows), K) mask of the right candidates of the queries `rows`.
    """
    placements = []
    for start in range(0, len(queries), CHUNK):
        rows = torch.arange(start, min(start + CHUNK, len(queries)), device=queries.device)
        scores = queries[rows] @ candidates.T  # (chunk, K)
        mask = right(rows)
        best = scores.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)  # (chunk, 1); -inf: no right one
        tied = scores == best
        counts = [(scores > best) & ~mask, tied & mask, tied & ~mask]
        placements.append(torch.stack([c.sum(dim=1) for c in counts], dim=1))
    return torch.cat(placements).cpu().double()


def _hit_chance(placed: Tensor, k: int) -> Tensor:
    """(Q,) the chance that a right candidate is among the k best under a random order of tied scores."""
    ahead, right, wrong = placed.unbind(dim=1)
    m = k - ahead  # places left for the tied group
    # P(the first m places of the group are all wrong) = C(w, m) / C(w + r, m), through log-gamma for large groups
    taken = m.clamp(0, None).minimum(wrong)
    all_wrong = torch.exp(
        torch.lgamma(wrong + 1)
        - torch.lgamma(wrong - taken + 1)
        - torch.lgamma(wrong + right + 1)
        + torch.lgamma(wrong + right - taken + 1)
    )
    chance = torch.where(m > wrong, 1.0, 1.0 - all_wrong)
    return torch.where((m <= 0) | (right == 0), 0.0, chance)


def _expected_rank(placed: Tensor) -> Tensor:
    """(Q,) the expected 1-based rank of the best right candidate under a random order of tied scores (inf where
    there is none): a + 1 + w / (r + 1)."""
    ahead, right, wrong = placed.unbind(dim=1)
    return torch.where(right > 0, ahead + 1 + wrong / (right + 1), float("inf"))


def _directions(names: tuple[str, str], forward: Tensor, backward: Tensor) -> list[tuple[str, Tensor]]:
    """("a_to_b", placements of a's queries), ("b_to_a", placements of b's queries)."""
    return [(f"{names[0]}_to_{names[1]}", forward), (f"{names[1]}_to_{names[0]}", backward)]
