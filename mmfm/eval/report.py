"""`mmfm eval`'s reports: eval.json (every number), eval.md (a table per task), PNG figures, and `--compare`.

An `eval.json` holds `format` ("mmfm-eval"), `mmfm_version`, `date`, `model`, `data`, `config` (tasks, metrics,
batch size, seed, ...), `fingerprints` (sha256 of the model's weights and of the data), `metrics`
({"val/<task>/<key>": value}), `confusion` ({task: {"classes", "matrix"}}), `samples` and `figures` (the PNG files
written beside it). Figures: `confusion_<task>.png` (classify and zero-shot tasks), `recall.png` (recall@k of every
retrieval direction), `qa_<task>.png` (chat accuracy per question family) and `samples_<task>.png` (generated
images under their labels, framed by the judge's verdict).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmfm.errors import InputError

FORMAT = "mmfm-eval"
REPORT_NAME = "eval.json"
MARKDOWN_NAME = "eval.md"
COMPARE_NAME = "compare.md"
SHOWN_PER_LABEL = 8  # generated images per label in a samples figure
MISSING = "-"  # a metric a run lacks, in a comparison
_RECALL_KEY = re.compile(r"^r(\d+)_(.+)$")

# The metric names `mmfm eval --metrics` takes, with what each reports (the keys, after `val/<task>/`).
METRICS = {
    "loss": "every task's held-out loss (its training objective)",
    "token_accuracy": "caption: teacher-forced next-token accuracy",
    "bleu": "caption: BLEU-1..4 (bleu_1 .. bleu_4), corpus-level, as pycocoevalcap's Bleu",
    "cider_d": "caption: CIDEr-D, as pycocoevalcap's Cider (COCO's CIDEr-D)",
    "rouge_l": "caption: ROUGE-L, as pycocoevalcap's Rouge",
    "exact_match": "caption: the greedy caption equals one of the references",
    "top1": "classify: top-1 accuracy",
    "top5": "classify: top-5 accuracy (5 classes or more)",
    "per_class": "classify: accuracy/<class> per class, and the confusion matrix",
    "recall": "contrastive: r1/r5/r10_<a>_to_<b> both ways, a hit is the paired item",
    "median_rank": "contrastive: median_rank_<a>_to_<b>, the paired item's expected 1-based rank (ties at random)",
    "label_recall": "contrastive: label_r1/r5/r10_<a>_to_<b>, a hit is a neighbour with the same label",
    "reply_accuracy": "chat: right replies, overall and reply_accuracy/<family>",
    "judged_accuracy": "image_gen (mmfm eval): generated images the judge reads as the item's label",
    "diversity": "image_gen (mmfm eval): mean pairwise RMS distance of one label's images, averaged",
    "clip_score": "image_gen (mmfm eval): CLIPScore of a text prompt and its image (model with a contrastive head)",
}
CAPTION_GENERATED = {"bleu", "cider_d", "rouge_l", "exact_match"}  # the metrics that need generated captions
_RECALL_NAME = re.compile(r"(label_)?r\d+_")
_GROUPED = re.compile(r"(bleu_|(?:label_)?r)(\d+)(_.+)?")  # keys that share a terminal table row with their kin


def metric_name(key: str) -> str:
    """The `METRICS` name a metric key belongs to: "bleu_2" -> "bleu", "accuracy/7" -> "per_class", ...

    Args:
        key: a metric key without its `val/<task>/` prefix.
    """
    if key.startswith("bleu_"):
        return "bleu"
    if key.startswith("accuracy/"):
        return "per_class"
    if key.startswith("reply_accuracy"):
        return "reply_accuracy"
    if key.startswith("median_rank_"):
        return "median_rank"
    if match := _RECALL_NAME.match(key):
        return "label_recall" if match.group(1) else "recall"
    return key


def parse_metrics(names: str | Iterable[str] | None) -> frozenset[str] | None:
    """The metric names a user asked for (comma-separated or a list); None means all of them.

    Raises:
        InputError: a name that is not in `METRICS`, with the closest names as a suggestion.
    """
    if names is None:
        return None
    chosen = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    chosen = [n for n in chosen if n]
    if not chosen:
        raise InputError("--metrics: no metric named; choose from " + ", ".join(METRICS))
    for name in chosen:
        if name not in METRICS:
            close = difflib.get_close_matches(name, METRICS, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(METRICS)}"
            raise InputError(f"--metrics: unknown metric {name!r}{hint}")
    return frozenset(chosen)


def report_of(run: Any, figures: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON-ready report of an `mmfm.eval.run.EvalRun`: see the module docstring."""
    return {
        "format": FORMAT,
        "mmfm_version": run.version,
        "date": run.date,
        "model": run.model,
        "data": run.data,
        "config": run.config,
        "fingerprints": run.fingerprints,
        "metrics": run.metrics,
        "confusion": {
            task: {"classes": list(classes), "matrix": matrix.tolist()}
            for task, (classes, matrix) in run.confusion.items()
        },
        "samples": run.samples,
        "figures": list(figures),
    }


def write_report(run: Any, out: str | Path) -> list[Path]:
    """Writes an `mmfm.eval.run.EvalRun`'s report: to `out` as JSON alone when it ends in .json, else into `out`.

    The folder gets eval.json, eval.md and the figures. Every file is written to a temporary name and renamed,
    so an earlier report is never left half-written.

    Returns:
        The files written.

    Raises:
        InputError: `out` cannot be written (see `prepare_output`).
    """
    if str(out).endswith(".json"):
        path = prepare_output(out)
        write_json_atomically(path, report_of(run))
        return [path]
    folder = prepare_output(out, folder=True)
    figures = draw_figures(report_of(run), folder) + _sample_figures(run, folder)
    report = report_of(run, [p.name for p in figures])
    write_json_atomically(folder / REPORT_NAME, report)
    _write_text_atomically(folder / MARKDOWN_NAME, markdown(report))
    return [folder / REPORT_NAME, folder / MARKDOWN_NAME, *figures]


def load_report(path: str | Path) -> dict[str, Any]:
    """An eval.json back as a dict: `path` is the file or a folder holding one.

    Raises:
        InputError: no such file, or it is not an eval.json that `mmfm eval` wrote (not JSON, no "format":
            "mmfm-eval", or its metrics are not numbers); the message names the path.
    """
    file = Path(path) / REPORT_NAME if Path(path).is_dir() else Path(path)
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        where = f"{path} holds no {REPORT_NAME}" if Path(path).is_dir() else f"{path}: no such file"
        raise InputError(f"--compare: {where}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"--compare: {file} is not an eval.json written by mmfm eval ({e})") from None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise InputError(f'--compare: {file} is not an eval.json written by mmfm eval (no "format": "{FORMAT}")')
    metrics = report.get("metrics")
    if not isinstance(metrics, dict) or not all(_is_number(v) for v in metrics.values()):
        raise InputError(f"--compare: {file}: 'metrics' must map metric names to numbers")
    return report


def markdown(report: Mapping[str, Any]) -> str:
    """eval.md: what was evaluated, then a table of every metric per task, each with its figures."""
    config, prints = report["config"], report["fingerprints"]
    lines = [
        f"# mmfm eval: {report['model']} on {report['data']}",
        "",
        f"mmfm {report['mmfm_version']}, {report['date']}; seed {config['seed']}, batch size {config['batch_size']}, "
        f"metrics: {', '.join(config['metrics']) if config.get('metrics') else 'all'}",
        f"model sha256 {prints['model_sha256'][:16]} ({_hashed(prints)}); data sha256 {prints['data_sha256'][:16]} "
        f"({prints['data_files']} files)",
    ]
    figures = report.get("figures", [])
    for task in config["tasks"]:
        name = task["name"]
        rows = {k.split("/", 2)[2]: v for k, v in report["metrics"].items() if k.split("/")[1] == name}
        if not rows:
            continue
        inputs = ", ".join(task["inputs"]) or "text"
        lines += ["", f"## {name} ({task['objective']}: {inputs})", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {format_value(value)} |" for key, value in rows.items()]
        shown = [f for f in figures if f.removesuffix(".png").split("_", 1)[-1] == name]
        lines += [""] + [f"![{f}]({f})" for f in shown] if shown else []
    if "recall.png" in figures:
        lines += ["", "## recall@k", "", "![recall@k](recall.png)"]
    if report.get("samples"):
        lines += ["", "## samples", "", "```", *report["samples"], "```"]
    return "\n".join(lines) + "\n"


def metrics_table(metrics: Mapping[str, float], lowest: int = 3) -> str:
    """The metrics as a terminal table, one block of rows per task, as `mmfm eval` prints them.

    Related keys share a row: "bleu_1/2/3/4", "r1/5/10_image_to_text" (and their label_ variant) list their values
    side by side; per-class and per-family accuracies ("accuracy/<class>", "reply_accuracy/<family>") show the
    `lowest` classes or families only, with how many there are (eval.json and eval.md keep every one).

    Args:
        metrics: {"val/<task>/<key>": value}, tasks in the order their first key comes.
        lowest: how many per-class or per-family accuracies to show.
    """
    tasks: dict[str, dict[str, list[tuple[str, float]]]] = {}  # task -> row -> [(part, value)]
    for key, value in metrics.items():
        _, task, name = key.split("/", 2)
        tasks.setdefault(task, {}).setdefault(_row_of(name), []).append((_part_of(name), value))
    rows = [("task", "metric", "value")]
    for task, groups in tasks.items():
        for row, parts in groups.items():
            shown = " ".join(format_value(v) for _, v in parts)
            if row.endswith(("/<class>", "/<family>")):
                worst = sorted(parts, key=lambda p: p[1])[:lowest]
                row = f"{row}, lowest {len(worst)} of {len(parts)}" if len(parts) > len(worst) else row
                shown = "  ".join(f"{part}: {format_value(v)}" for part, v in worst)
            elif row.startswith("median_rank_"):  # an expected rank: a decimal is enough
                shown = f"{parts[0][1]:.1f}"
            elif parts[0][0]:
                row = row.format("/".join(p for p, _ in parts))
            rows.append((task, row, shown))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines, previous = [], None
    for task, metric, value in rows:
        shown = "" if task == previous else task  # a task's name on its first row only
        lines.append(f"{shown:<{widths[0]}}  {metric:<{widths[1]}}  {value}".rstrip())
        previous = task
    return "\n".join(lines) + "\n"


def _row_of(name: str) -> str:
    """The row a metric key goes to: "bleu_{}" for bleu_2, "r{}_image_to_text" for r5_image_to_text,
    "accuracy/<class>" for accuracy/7, "reply_accuracy/<family>" per family, else the key itself."""
    if match := _GROUPED.fullmatch(name):
        return f"{match.group(1)}{{}}{match.group(3) or ''}"
    if "/" in name:
        return name.split("/", 1)[0] + ("/<class>" if name.startswith("accuracy/") else "/<family>")
    return name


def _part_of(name: str) -> str:
    """What tells a metric apart in its row: the n of bleu_n, the k of r<k>_..., the class or family; else ""."""
    if match := _GROUPED.fullmatch(name):
        return match.group(2)
    return name.split("/", 1)[1] if "/" in name else ""


def format_value(value: float) -> str:
    """A metric as the tables show it: 4 decimals."""
    return f"{value:.4f}"


def draw_figures(report: Mapping[str, Any], folder: Path) -> list[Path]:
    """The figures a report's numbers make: confusion matrices, the recall@k curves and per-family QA bars."""
    from mmfm.eval.figures import bar_figure, confusion_figure, recall_figure

    written = []
    for task, confusion in report.get("confusion", {}).items():
        path = folder / f"confusion_{task}.png"
        written.append(confusion_figure(confusion["matrix"], confusion["classes"], path, title=f"{task}: confusion"))
    curves = recall_curves(report["metrics"])
    if curves:
        written.append(recall_figure(curves, folder / "recall.png"))
    for task, families in family_accuracy(report["metrics"]).items():
        path = folder / f"qa_{task}.png"
        written.append(bar_figure(families, path, f"{task}: right replies per question family", "accuracy"))
    return written


def _sample_figures(run: Any, folder: Path) -> list[Path]:
    from mmfm.eval.figures import sample_grid_figure

    written = []
    for task, generated in run.generated.items():
        shown = min(SHOWN_PER_LABEL, max(generated.labels.count(label) for label in set(generated.labels)))
        keep = [i for i, label in enumerate(generated.labels) if generated.labels[: i + 1].count(label) <= shown]
        verdicts = None if generated.verdicts is None else [generated.verdicts[i] for i in keep]
        images, labels = [generated.images[i] for i in keep], [generated.labels[i] for i in keep]
        written.append(sample_grid_figure(images, labels, verdicts, folder / f"samples_{task}.png", columns=shown))
    return written


def recall_curves(metrics: Mapping[str, float], run: str | None = None) -> dict[str, dict[int, float]]:
    """{"<task> <direction>": {k: R@k}} from the paired-item recall metrics (`val/<task>/r<k>_<direction>`)."""
    curves: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        _, task, name = key.split("/", 2)
        if match := _RECALL_KEY.match(name):
            line = f"{run} {task} {match.group(2)}" if run else f"{task} {match.group(2)}"
            curves.setdefault(line, {})[int(match.group(1))] = value
    return curves


def family_accuracy(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """{chat task: {family: accuracy}} from `val/<task>/reply_accuracy/<family>`."""
    families: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        _, task, name = key.split("/", 2)
        if name.startswith("reply_accuracy/"):
            families.setdefault(task, {})[name.split("/", 1)[1]] = value
    return families


def compare(runs: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], dict[str, list[str]]]:
    """A side-by-side table of every metric of several reports, with each run's delta against the first.

    Args:
        runs: {run name: report (`load_report`)}, the first being the baseline.

    Returns:
        The markdown table's lines, and {run name: the metrics it lacks that another run has} for the runs that
        lack any (shown as "-" in the table).
    """
    names = list(runs)
    every: list[str] = []
    for report in runs.values():
        every += [k for k in report["metrics"] if k not in every]
    header = ["metric", names[0]] + [part for name in names[1:] for part in (name, f"Δ {name}")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = runs[names[0]]["metrics"]
    for key in every:
        cells = [key, format_value(base[key]) if key in base else MISSING]
        for name in names[1:]:
            value = runs[name]["metrics"].get(key)
            cells.append(MISSING if value is None else format_value(value))
            cells.append(MISSING if value is None or key not in base else f"{value - base[key]:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    missing = {name: [k for k in every if k not in runs[name]["metrics"]] for name in names}
    return lines, {name: keys for name, keys in missing.items() if keys}


def compare_runs(paths: Sequence[str | Path], out: str | Path | None = None) -> str:
    """`mmfm eval --compare`: the comparison as printable text; with `out`, also compare.md and figures there.

    Args:
        paths: eval.json files, or folders holding one; the first is the baseline.
        out: a folder for compare.md, recall.png (every run's curves) and qa_<task>.png (every run's bars).

    Raises:
        InputError: fewer than two runs, or a path that is not an eval.json (`load_report`).
    """
    if len(paths) < 2:
        raise InputError(f"--compare needs at least two runs (eval.json files or folders), got {len(paths)}")
    folder = prepare_output(out, folder=True) if out is not None else None
    runs = {_run_name(p, paths): load_report(p) for p in paths}
    lines, missing = compare(runs)
    notes = [f"{name} lacks {len(keys)}: {', '.join(keys)}" for name, keys in missing.items()]
    text = "\n".join(lines + ([""] + notes if notes else [])) + "\n"
    if folder is not None:
        _write_text_atomically(folder / COMPARE_NAME, "# mmfm eval --compare\n\n" + text)
        _compare_figures(runs, folder)
    return text


def _compare_figures(runs: Mapping[str, Mapping[str, Any]], folder: Path) -> None:
    from mmfm.eval.figures import bar_figure, recall_figure

    curves = {line: c for name, r in runs.items() for line, c in recall_curves(r["metrics"], name).items()}
    if curves:
        recall_figure(curves, folder / "recall.png")
    tasks: dict[str, dict[str, dict[str, float]]] = {}
    for name, report in runs.items():
        for task, families in family_accuracy(report["metrics"]).items():
            tasks.setdefault(task, {})[name] = families
    for task, by_run in tasks.items():
        bar_figure(by_run, folder / f"qa_{task}.png", f"{task}: right replies per question family", "accuracy")


def _run_name(path: str | Path, paths: Sequence[str | Path]) -> str:
    """A run's column name: the path as given, its eval.json dropped."""
    name = str(path).removesuffix("/" + REPORT_NAME) if str(path).endswith("/" + REPORT_NAME) else str(path)
    return name if [str(p) for p in paths].count(str(path)) == 1 else f"{name} #{list(paths).index(path) + 1}"


def prepare_output(out: str | Path, name: str = "out", folder: bool = False) -> Path:
    """`out` as a file (or with `folder`, a folder) that can be written: its folder is created, what is in the way
    refused. Checked before anything is computed, so that results are never lost to a bad path.

    Raises:
        InputError: the file is a folder (or not a regular file), the folder is a file, a file stands where a
            folder of its path should be, or the folder cannot be written; the message names `out` and the reason.
    """
    path = Path(out)
    directory = path if folder else path.parent
    where = f"{name} {out}: cannot write the {'report' if folder else 'metrics'}"
    try:
        if not folder and (path.is_dir() or (path.exists() and not path.is_file())):
            raise InputError(f"{where} ({'it is a folder; name a file' if path.is_dir() else 'not a regular file'})")
        if folder and path.exists() and not path.is_dir():
            raise InputError(f"{where} (it is a file; name a folder, or a file ending in .json)")
        directory.mkdir(parents=True, exist_ok=True)
    except InputError:
        raise
    except (OSError, ValueError) as e:  # a file in place of a folder, no permission, a name too long, a NUL
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker else getattr(e, "strerror", None) or e
        raise InputError(f"{where} ({reason})") from None
    if not os.access(directory, os.W_OK | os.X_OK) or (not folder and path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{where} (the folder {directory} is not writable)")
    return path


def write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    """Writes `data` as JSON to a temporary file beside `path`, then renames it into place."""
    _write_text_atomically(path, json.dumps(data, indent=2) + "\n")


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"out {path}: cannot write the report ({e.strerror or e})") from None


def _hashed(prints: Mapping[str, Any]) -> str:
    return "its state dict" if prints["model_hashed"] == "state_dict" else f"{prints['model_files']} weight files"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
