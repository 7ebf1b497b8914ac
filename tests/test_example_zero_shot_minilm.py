"""examples/zero_shot_minilm.py runs end to end on a tiny step budget and prints its accuracies."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "zero_shot_minilm.py"


def test_zero_shot_minilm_example_runs(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(EXAMPLE), "--steps", "3", "--out", str(tmp_path), "--no-save"]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)

    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"zero-shot accuracy, prompts like 'seven': [01]\.\d{3}", run.stdout)
    assert re.search(
        r"zero-shot accuracy \(ensemble of the three prompts\) on \d+ held-out digits: [01]\.\d{3}", run.stdout
    )
    assert (tmp_path / "digits" / "val.jsonl").is_file() and not (tmp_path / "model").exists()
