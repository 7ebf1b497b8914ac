"""Question answering and chat: is a reply right, after normalising away case, punctuation and number words.

Replies are compared with their reference after `normalize_answer`: lower case, punctuation as spaces (the
arithmetic signs + - = kept), single spaces, and number words as digits, so "It is a Seven!" equals "it is a 7".
Where an item gives a short `answer` (a word or phrase), the reply is right when the answer's normalised words
occur in it, in order; otherwise the whole normalised reply must equal a reference's.

```python
qa_accuracy(["It is a seven.", "Paris, I think"], ["it is a 7", "Paris."], answers=[None, "paris"],
            families=["digit", "capital"])   # {"accuracy": 1.0, "accuracy/capital": 1.0, "accuracy/digit": 1.0}
```
"""

from __future__ import annotations

import string
from collections import defaultdict
from collections.abc import Sequence

from mmfm.errors import InputError
from mmfm.eval.checks import check_lengths, reference_lists

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


def is_correct(reply: str, reference: str | Sequence[str], answer: str | None = None) -> bool:
    """Whether a reply is right: it contains `answer`'s words in order, or (no answer) equals a reference.

    Args:
        reply: what the model said.
        reference: the reference reply, or several acceptable ones.
        answer: the word or phrase a right reply must contain; None compares whole replies.
    """
    said = normalize_answer(reply)
    if answer is None:
        return any(said == normalize_answer(r) for r in ([reference] if isinstance(reference, str) else reference))
    wanted = normalize_answer(answer)
    return any(said[i : i + len(wanted)] == wanted for i in range(len(said) - len(wanted) + 1))


def qa_accuracy(
    replies: Sequence[str],
    references: Sequence[str | Sequence[str]],
    answers: Sequence[str | None] | None = None,
    families: Sequence[str] | None = None,
) -> dict[str, float]:
    """The fraction of right replies (`is_correct`), overall and per question family.

    Args:
        replies: the model's replies.
        references: each reply's reference, or a list of acceptable references.
        answers: each item's short answer, or None where the whole reply is compared; None for all items.
        families: each item's question family; None reports the overall accuracy only.

    Returns:
        {"accuracy": ..., "accuracy/<family>": ...} (families in sorted order).

    Raises:
        InputError: inputs of different lengths, nothing to score, an item without references, or a reply,
            answer or family that is not a string.
    """
    check_lengths(replies, references, ("replies", "references"))
    references = reference_lists(references)
    _strings("replies", replies)
    if answers is not None:
        check_lengths(replies, answers, ("replies", "answers"))
        _strings("answers", answers, optional=True)
    correct = [
        is_correct(reply, refs, None if answers is None else answers[i])
        for i, (reply, refs) in enumerate(zip(replies, references))
    ]
    return accuracy_by_family(correct, families)


def accuracy_by_family(correct: Sequence[bool], families: Sequence[str] | None = None) -> dict[str, float]:
    """{"accuracy": the fraction of `correct` that is True, "accuracy/<family>": the same within each family}.

    Args:
        correct: whether each item was right.
        families: each item's family; None reports the overall accuracy only.
    """
    if not len(correct):
        raise InputError("no replies: nothing to score")
    metrics = {"accuracy": sum(map(bool, correct)) / len(correct)}
    if families is None:
        return metrics
    check_lengths(correct, families, ("replies", "families"))
    _strings("families", families)
    groups: dict[str, list[bool]] = defaultdict(list)
    for ok, family in zip(correct, families):
        groups[family].append(bool(ok))
    return metrics | {f"accuracy/{family}": sum(oks) / len(oks) for family, oks in sorted(groups.items())}


def _strings(name: str, values: Sequence, optional: bool = False) -> None:
    """Raises InputError naming the first value that is not a string (None allowed when `optional`)."""
    bad = next(((i, v) for i, v in enumerate(values) if not isinstance(v, str) and not (optional and v is None)), None)
    if bad is not None:
        raise InputError(f"{name}[{bad[0]}] is {type(bad[1]).__name__} {bad[1]!r}: {name} are strings")
