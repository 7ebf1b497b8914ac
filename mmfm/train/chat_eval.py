"""Held-out metrics of a chat model: is the generated reply right, overall and per question family.

Each held-out conversation is cut before its last assistant turn; the model answers what comes before (with the
media those turns name), greedily, and the reply is compared with the reference by `mmfm.eval.qa.is_correct`
(after `normalize_answer`: case, punctuation, spacing, and number words as digits, so "It is a Seven!" equals "it
is a 7"). A conversation that gives an `answer` (a word or phrase) is right when its normalised words occur in the
normalised reply; otherwise the whole normalised reply must equal the reference turn's.

Metrics: `reply_accuracy` over all conversations and `reply_accuracy/<family>` per question family.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmfm.chat_format import count_placeholders
from mmfm.eval.qa import accuracy_by_family, is_correct, normalize_answer

# is_correct and normalize_answer are mmfm.eval.qa's, importable from here as before
__all__ = ["is_correct", "normalize_answer", "question_and_reference", "reply_metrics"]


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
    records = []
    for item, (turns, _, reference), reply in zip(items, questions, replies):
        ok = is_correct(reply, reference, item.get("answer"))
        family = item.get("family", "all")
        question = turns[-1]["content"]
        records.append({"family": family, "question": question, "reply": reply, "reference": reference, "correct": ok})
    families = [r["family"] for r in records]
    accuracy = accuracy_by_family([r["correct"] for r in records], None if set(families) == {"all"} else families)
    return {f"reply_{key}": value for key, value in accuracy.items()}, records
