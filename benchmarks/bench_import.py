"""Start-up cost: `import mmfm` and `mmfm --help` against `import torch`, each in a fresh interpreter.

Every round starts three new processes, interleaved (the order flips every round, see `harness.compare`), and
times each from start to exit:

    python -c "import torch"
    python -c "import mmfm"
    mmfm --help                  (the console script beside the interpreter; `python -m mmfm --help` without it)
    python -c "import mmfm.model"   (the model code and what it needs, torch included: no heavy optional library)

torch is the floor of any use of a model. `import mmfm` itself defers its names (PEP 562), so it imports no torch
and the first two lines are not what a model costs; the third is, and gets its own summary line against the
same 1.3x target (`model_import_vs_torch`). Targets: `import mmfm` at most 1.3x
and `mmfm --help` at most 1.5x the time of `import torch`, which holds only while the heavy optional libraries
(diffusers, open_clip, timm, transformers, ...) stay unimported until a feature needs them. The packages that
`import mmfm` adds over `import torch` are listed below the table, to show what a miss is made of.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import Result, compare

TARGET_IMPORT = 1 / 1.3  # `import mmfm` may take at most 1.3x `import torch`
TARGET_HELP = 1 / 1.5  # `mmfm --help` may take at most 1.5x `import torch`
REPO = Path(__file__).resolve().parents[1]


def main(quick: bool = False) -> list[Result]:
    """Prints the timing table and the packages mmfm adds; returns both ratios, t_torch / t_mmfm."""
    rounds = 2 if quick else 10
    commands = {
        "import mmfm": [sys.executable, "-c", "import mmfm"],
        "mmfm --help": [*_mmfm_command(), "--help"],
        "import torch": [sys.executable, "-c", "import torch"],
        "import mmfm.model": [sys.executable, "-c", "import mmfm.model"],
    }
    result = compare({name: lambda cmd=cmd: _run(cmd) for name, cmd in commands.items()}, rounds=rounds, warmup=1)
    print("\nstart-up, each command in a fresh process (wall time from start to exit)")
    print(result.format("start-up"))
    torch_packages = _top_level_packages("import torch")
    for code in ("import mmfm", "import mmfm.model"):
        added = _top_level_packages(code) - torch_packages
        print(f"packages `{code}` adds over `import torch`: {', '.join(sorted(added)) or 'none'}")
    return [
        Result("import_vs_torch", result.ratio("import mmfm", "import torch"), TARGET_IMPORT, "t_torch / t_import"),
        Result("help_vs_torch", result.ratio("mmfm --help", "import torch"), TARGET_HELP, "t_torch / t_help"),
        Result(
            "model_import_vs_torch",
            result.ratio("import mmfm.model", "import torch"),
            TARGET_IMPORT,
            "t_torch / t_import_model",
        ),
    ]


def _mmfm_command() -> list[str]:
    script = Path(sys.executable).with_name("mmfm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mmfm"]


def _run(command: list[str]) -> None:
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, timeout=600)


def _top_level_packages(code: str) -> set[str]:
    """Top-level packages in `sys.modules` after running `code` in a fresh interpreter, except the standard library."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True, capture_output=True, text=True).stdout
    names = json.loads(out.splitlines()[-1])
    return {name for name in names if name not in sys.stdlib_module_names and not name.startswith("_")}


if __name__ == "__main__":
    main()
