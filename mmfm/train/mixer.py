"""The multi-task mixer: which task each optimizer step trains, drawn by ratio from its own seeded generator."""

from __future__ import annotations

import torch

from mmfm.train.config import TaskConfig


class TaskMixer:
    """Picks the tasks of each optimizer step: one drawn with probability proportional to its `ratio` ("sample"),
    or every task, their weighted losses summed on the same batch ("all").

    The draws come from a private `torch.Generator`, so they never depend on (or disturb) the global RNG,
    every rank draws the same task, and a resumed run continues the same sequence.
    """

    def __init__(self, tasks: list[TaskConfig], seed: int, mode: str = "sample"):
        self.tasks = list(tasks)
        self.mode = mode
        self.probs = torch.tensor([t.ratio for t in tasks], dtype=torch.float64)
        self.probs /= self.probs.sum()
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> list[TaskConfig]:
        if self.mode == "all" or len(self.tasks) == 1:
            return self.tasks
        return [self.tasks[int(torch.multinomial(self.probs, 1, generator=self.generator))]]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
