"""A recipe's task -> the objective that trains it, found through the head table (`mmfm.config.HEADS`).

The objective classes live beside the heads they train (`mmfm.heads.caption.CaptionObjective`, ...); the
contract they share is `mmfm.objective.Objective`.
"""

from __future__ import annotations

from mmfm.config import OBJECTIVE_HEADS, objective_class
from mmfm.errors import ConfigError
from mmfm.objective import Objective
from mmfm.train.config import TaskConfig


def build_objective(task: TaskConfig, model) -> Objective:
    """The objective of a task, after checking the model has the head and encoders it needs."""
    head = OBJECTIVE_HEADS[task.objective]
    if head not in model.heads:
        raise ConfigError(
            f"task '{task.name}' ({task.objective}) needs the model's '{head}' head, but the model has: "
            f"{', '.join(model.heads) or 'no heads'}; set model_overrides.{head} or use a model config that has it"
        )
    for m in task.inputs:
        if m != "text" and m not in model.encoders:
            raise ConfigError(f"task '{task.name}' reads {m}, but the model has no {m} encoder")
    return objective_class(task.objective)(task)
