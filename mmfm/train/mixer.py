"""The multi-task mixer: which task each optimizer step trains, drawn by ratio from its own seeded generator."""

from __future__ import annotations

import torch

from mmfm.train.config import TaskConfig


class TaskMixer:
    """Samples one task per optimizer step with probability proportional to its `ratio`.

    The draws come from a private `torch.Generator`, so they never depend on (or disturb) the global RNG,
    every rank draws the same task, and a resumed run continues the same sequence.
    """

    def __init__(self, tasks: list[TaskConfig], seed: int):
        self.tasks = list(tasks)
        self.probs = torch.tensor([t.ratio for t in tasks], dtype=torch.float64)
        self.probs /= self.probs.sum()
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> TaskConfig:
        if len(self.tasks) == 1:
            return self.tasks[0]
        return self.tasks[int(torch.multinomial(self.probs, 1, generator=self.generator))]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
