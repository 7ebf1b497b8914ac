"""Zero-shot classifiers from prompt templates, by open_clip's template ensembling.

`model.classify(..., labels=[...])` builds its classifier with `zero_shot_weights`; `mmfm.eval.classification`
re-exports it for evaluation code. It takes any text embedder, so it builds classifiers for other models too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfm.errors import InputError


def zero_shot_weights(
    embed_text: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
) -> Tensor:
    """(C, E) zero-shot classifier weights by template ensembling, as open_clip builds them.

    Every class name is written into every template; each prompt's text embedding is normalised, the
    embeddings of one class are averaged, and the average is normalised again. Scores of an item are then
    the dot products of its unit embedding with these rows.

    Args:
        embed_text: texts -> (len(texts), E) embeddings, e.g. `lambda texts: model.embed(text=texts)`.
        class_names: the C classes.
        templates: prompts with a "{}" where the class name goes (e.g. "a photo of a {}."), or functions
            from a class name to a prompt.

    Raises:
        InputError: no classes, no templates, a string template without "{}", or embeddings of the wrong shape.
    """
    if not len(class_names):
        raise InputError("class_names is empty: zero-shot classification needs at least one class")
    if not len(templates):
        raise InputError("templates is empty: zero-shot classification needs at least one prompt template")
    for i, template in enumerate(templates):
        if isinstance(template, str) and "{}" not in template:
            raise InputError(f'templates[{i}] {template!r} has no "{{}}" for the class name')
        if not isinstance(template, str) and not callable(template):
            raise InputError(f"templates[{i}] must be a string or a function, got {type(template).__name__}")
    prompts = [t.format(c) if isinstance(t, str) else t(c) for c in class_names for t in templates]
    embeddings = torch.as_tensor(embed_text(prompts))  # (C * T, E)
    if embeddings.dim() != 2 or len(embeddings) != len(prompts) or not embeddings.is_floating_point():
        raise InputError(
            f"embed_text must return a ({len(prompts)}, E) float tensor for the {len(prompts)} prompts, "
            f"got shape {tuple(embeddings.shape)} and dtype {embeddings.dtype}"
        )
    embeddings = F.normalize(embeddings, dim=-1).view(len(class_names), len(templates), -1)
    return F.normalize(embeddings.mean(dim=1), dim=-1)
