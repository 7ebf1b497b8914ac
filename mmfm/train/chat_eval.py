"""Held-out metrics of a chat model: is the generated reply right, overall and per question family.

Each held-out conversation is cut before its last assistant turn; the model answers what comes before (with the
media those turns name), greedily, and the reply is compared with the reference after normalisation
(`normalize_answer`: case, punctuation, spacing, and number words as digits, so "It is a Seven!" equals "it is a
7"). A conversation that gives an `answer` (a word or phrase) is right when its normalised words occur in the
normalised reply; otherwise the whole normalised reply must equal the reference turn's.

Metrics: `reply_accuracy` over all conversations and `reply_accuracy/<family>` per question family.
"""

from __future__ import annotations

import string
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from mmfm.chat_format import count_placeholders

NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation if c not in "+-="})


def normalize_answer(text: str) -> list[str]:
    """The words of an answer, lower-cased, without punctuation (arithmetic signs kept), number words as digits."""
    words = text.lower().translate(_PUNCTUATION).split()
    return [NUMBER_WORDS.get(w, w) for w in words]


def is_correct(reply: str, reference: str, answer: str | None = None) -> bool:
    """Whether a reply is right: it contains `answer`'s words in order, or (no answer) equals the reference."""
    said = normalize_answer(reply)
    if answer is None:
        return said == normalize_answer(reference)
    wanted = normalize_answer(answer)
    return any(said[i : i + len(wanted)] == wanted for i in range(len(said) - len(wanted) + 1))


def question_and_reference(item: dict[str, Any]) -> tuple[list[dict[str, str]], dict[str, list], str]:
    """A conversation item cut before its last assistant turn: the turns, the media they name, the reference."""
    messages = item["messages"]
    last = max(i for i, turn in enumerate(messages) if turn["role"] == "assistant")
    turns = messages[:last]
    counts = count_placeholders(turns)
    media = {m: list(values[: counts[m]]) for m, values in item["media"].items()}
    return turns, media, messages[last]["content"]


def reply_metrics(
    model: Any, items: Sequence[dict[str, Any]], batch_size: int = 32, max_new_tokens: int = 32
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generates every conversation's reply and scores it; see the module docstring.

    Args:
        model: a chat model (`model.chat`).
        items: conversation items of a `ManifestDataset` (`messages`, `media`, optional `family` and `answer`).
        batch_size: conversations generated together.
        max_new_tokens: the longest reply.

    Returns:
        The metrics, and one record per item: family, reply, reference and whether it was right.
    """
    questions = [question_and_reference(item) for item in items]
    replies = model.chat(
        [turns for turns, _, _ in questions],
        images=[media.get("image", []) for _, media, _ in questions],
        audio=[media.get("audio", []) for _, media, _ in questions],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    right: dict[str, list[bool]] = defaultdict(list)
    records = []
    for item, (turns, _, reference), reply in zip(items, questions, replies):
        ok = is_correct(reply, reference, item.get("answer"))
        family = item.get("family", "all")
        right[family].append(ok)
        question = turns[-1]["content"]
        records.append({"family": family, "question": question, "reply": reply, "reference": reference, "correct": ok})
    every = [ok for oks in right.values() for ok in oks]
    metrics = {"reply_accuracy": sum(every) / len(every)}
    if set(right) != {"all"}:
        metrics |= {f"reply_accuracy/{family}": sum(oks) / len(oks) for family, oks in sorted(right.items())}
    return metrics, records
