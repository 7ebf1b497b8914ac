"""Building a model, loading one and the first caption: this tree against a baseline git ref (default c4e2815).

The baseline is checked out into a temporary `git worktree add --detach` and removed at the end. Every round
starts one fresh interpreter per side (old/new order flipping every round) that does, in this order, timing
each step:

    import torch
    import mmfm
    mmfm.create_model("mmfm-small")          # mmfm-test in the quick run; then once more, imports warm
    mmfm.load(folder)                        # a saved mmfm-tiny with a caption head (mmfm-test in the quick run)
    model.caption(images=[image.png])        # the first caption call of the process

plus the wall time of the whole process. The saved folder is written once, by the baseline, and both sides
load it (old checkpoints must keep loading), so both caption with the same weights and the captions are
checked to match. Ratios are per round, t_old / t_new: above 1 the tree is faster; the table also shows new/old.

Which mmfm a child imports: the child installs a finder in front of `sys.meta_path` that maps the package names
in the tree's own `package_dir` (setup.cfg or pyproject.toml: mmfm, mmfm.encoders, mmfm.heads, mmfm.configs)
to that tree's folders, so neither the venv's editable install (which maps mmfm.encoders etc. to the folders
of the tree it was installed from) nor the working directory can mix trees. Each child reports the files of
mmfm, mmfm.encoders and mmfm.heads it imported, and the parent checks they lie in the tree it meant.

    python -m benchmarks.bench_build_caption [--quick] [--baseline REF] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.harness import THREADS, Ratio, Result, table

REPO = Path(__file__).resolve().parents[1]
BASELINE = "c4e2815"  # the commit before issue 10
TARGET = 1.0  # no slower than the baseline
PHASES = (
    "import torch",
    "import mmfm",
    "create_model",
    "import mmfm + create_model",
    "create_model again",
    "load",
    "first caption",
    "process",
)
HEADLINES = {  # the phases that get a summary line, and its name
    # mmfm imports its encoders and heads (timm, diffusers) when a model first needs them, so the first
    # create_model pays imports that `import mmfm` used to: compare the two together, and a build on warm imports
    "import mmfm + create_model": "import_build_vs_baseline",
    "create_model again": "build_vs_baseline",
    "load": "load_vs_baseline",
    "first caption": "caption_vs_baseline",
    "process": "build_caption_process_vs_baseline",
}

# Run by `python -c` in a fresh interpreter: argv[1] is the tree, argv[2] a JSON job.
CHILD = r"""
import configparser, importlib.machinery, importlib.util, json, os, sys, time
start = time.perf_counter()
tree, job = sys.argv[1], json.loads(sys.argv[2])

def package_dirs(tree):
    dirs = {}
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(tree, "setup.cfg"))
    if cfg.has_option("options", "package_dir"):
        for line in cfg.get("options", "package_dir").splitlines():
            if "=" in line:
                name, folder = (s.strip() for s in line.split("=", 1))
                dirs[name] = folder
    pyproject = os.path.join(tree, "pyproject.toml")
    if os.path.exists(pyproject):
        import tomllib
        with open(pyproject, "rb") as f:
            dirs.update(tomllib.load(f).get("tool", {}).get("setuptools", {}).get("package-dir", {}))
    dirs.setdefault("mmfm", "mmfm")
    return {name: os.path.join(tree, folder) for name, folder in dirs.items() if name}

class TreeFinder:
    def __init__(self, dirs):
        self.dirs = dirs
    def find_spec(self, name, path=None, target=None):
        folder = self.dirs.get(name)
        if folder is None:
            return None
        init = os.path.join(folder, "__init__.py")
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])

sys.meta_path.insert(0, TreeFinder(package_dirs(tree)))
times = {}
t = time.perf_counter()
import torch
times["import torch"] = time.perf_counter() - t
t = time.perf_counter()
import mmfm
times["import mmfm"] = time.perf_counter() - t
import mmfm.encoders, mmfm.heads
files = {m.__name__: m.__file__ for m in (mmfm, mmfm.encoders, mmfm.heads)}
torch.set_num_threads(job["threads"])
torch.manual_seed(0)
out = {"files": files}
if job["task"] == "save":
    mmfm.create_model(job["preset"], **job["overrides"]).eval().save_pretrained(job["folder"])
else:
    t = time.perf_counter()
    mmfm.create_model(job["build"])
    times["create_model"] = time.perf_counter() - t
    times["import mmfm + create_model"] = times["import mmfm"] + times["create_model"]
    t = time.perf_counter()
    mmfm.create_model(job["build"])
    times["create_model again"] = time.perf_counter() - t
    t = time.perf_counter()
    model = mmfm.load(job["folder"])
    times["load"] = time.perf_counter() - t
    t = time.perf_counter()
    out["caption"] = model.caption(images=[job["image"]])
    times["first caption"] = time.perf_counter() - t
out["times"] = times
out["in_process"] = time.perf_counter() - start
print("BENCH-RESULT " + json.dumps(out))
"""


def main(quick: bool = False, baseline: str = BASELINE, rounds: int | None = None) -> list[Result]:
    """Prints the per-phase table (old, new, ratios) and returns t_old / t_new for each headline phase."""
    if rounds is None:
        rounds = 1 if quick else 10
    build = "mmfm-test" if quick else "mmfm-small"
    saved, overrides = ("mmfm-test", {}) if quick else ("mmfm-tiny", {"caption": {}})
    try:
        commit = _git("rev-parse", "--verify", f"{baseline}^{{commit}}").strip()
    except RuntimeError as e:
        print(f"\nbuild/load/caption vs baseline: skipped, {baseline} is not a commit of {REPO} ({e})")
        return []
    with tempfile.TemporaryDirectory(prefix="mmfm-bench-build-") as tmp:
        tmp = Path(tmp)
        old_tree = tmp / "baseline"
        _git("worktree", "add", "--detach", "--quiet", str(old_tree), commit)
        try:
            trees = {"old": old_tree, "new": REPO}
            folder, image = tmp / "saved", tmp / "image.png"
            _write_image(image)
            _child(old_tree, tmp, {"task": "save", "preset": saved, "overrides": overrides, "folder": str(folder)})
            job = {"task": "time", "build": build, "folder": str(folder), "image": str(image)}
            for side in ("old", "new"):  # warm-up: bytecode caches, page cache
                out = _child(trees[side], tmp, job)
                print(f"{side} ({trees[side]}): imports " + ", ".join(out["files"].values()))
            times: dict[str, dict[str, list[float]]] = {side: {p: [] for p in PHASES} for side in trees}
            captions = {}
            for r in range(rounds):
                for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
                    start = time.perf_counter()
                    out = _child(trees[side], tmp, job)
                    out["times"]["process"] = time.perf_counter() - start
                    for phase in PHASES:
                        times[side][phase].append(out["times"][phase])
                    captions[side] = out["caption"]
        finally:
            _git("worktree", "remove", "--force", str(old_tree))
    print(
        f"\nbuilding {build}, loading a saved {saved}{' with a caption head' if overrides else ''} and its first "
        f"caption: {_git('rev-parse', '--short', 'HEAD').strip()} + working tree (new) vs {baseline} (old), "
        f"each in a fresh process, {rounds} rounds, {THREADS} threads"
    )
    rows, results = [], []
    for phase in PHASES:
        speed = _ratio(times["old"][phase], times["new"][phase])
        old, new = statistics.median(times["old"][phase]), statistics.median(times["new"][phase])
        rows.append([phase, f"{old * 1e3:.0f} ms", f"{new * 1e3:.0f} ms", f"{new / old:.2f}", str(speed)])
        if phase in HEADLINES:
            results.append(Result(HEADLINES[phase], speed, TARGET, "t_old / t_new"))
    print(table(["phase", "old median", "new median", "new / old", "t_old / t_new median [min, max]"], rows))
    same = captions["old"] == captions["new"]
    print(f"first captions {'match' if same else 'DIFFER'}: old {captions['old']!r}, new {captions['new']!r}")
    return results


def _child(tree: Path, cwd: Path, job: dict) -> dict:
    """Runs CHILD for `tree` in a fresh interpreter; returns its result, after checking what it imported."""
    job = {"threads": THREADS, **job}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree), json.dumps(job)], cwd=cwd, env=env, capture_output=True, text=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH-RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the {job['task']} child for {tree} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1].removeprefix("BENCH-RESULT "))
    for name, file in out["files"].items():
        if not Path(file).resolve().is_relative_to(tree.resolve()):
            raise RuntimeError(f"the child for {tree} imported {name} from {file}, outside that tree")
    return out


def _git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def _write_image(path: Path) -> None:
    """A 224x224 RGB gradient."""
    ramp = np.linspace(0, 255, 224, dtype=np.float32)
    rgb = np.stack([ramp[None, :].repeat(224, 0), ramp[:, None].repeat(224, 1), 255 - ramp[None, :].repeat(224, 0)])
    Image.fromarray(rgb.transpose(1, 2, 0).astype(np.uint8)).save(path)


def _ratio(old: list[float], new: list[float]) -> Ratio:
    ratios = [o / n for o, n in zip(old, new)]
    return Ratio(statistics.median(ratios), min(ratios), max(ratios))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and 1 round, for a smoke run")
    parser.add_argument("--baseline", default=BASELINE, metavar="REF", help=f"git ref to compare with ({BASELINE})")
    parser.add_argument("--rounds", type=int, help="fresh-process rounds per side (default: 10, quick: 1)")
    args = parser.parse_args()
    main(quick=args.quick, baseline=args.baseline, rounds=args.rounds)
