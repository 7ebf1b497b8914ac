"""`mmfm eval`'s reports: eval.json round-trips, eval.md holds every metric, figures are PNGs, `--compare`."""

import json

import pytest
import torch
from PIL import Image

from mmfm.cli import main
from mmfm.errors import InputError
from mmfm.eval.report import compare_runs, format_value, load_report, metrics_table, report_of, write_report
from mmfm.eval.run import EvalRun, Generated

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(metrics: dict[str, float], chat: bool = True) -> EvalRun:
    """A finished evaluation with a classify, a retrieval, a chat and an image_gen task (no model needed)."""
    tasks = [
        {"name": "digit", "objective": "classify", "inputs": ["image"]},
        {"name": "image_text", "objective": "contrastive", "inputs": ["image", "text"]},
        {"name": "gen", "objective": "image_gen", "inputs": ["text"]},
    ] + ([{"name": "chat", "objective": "chat", "inputs": []}] if chat else [])
    images = [Image.new("L", (8, 8), 30 * i) for i in range(4)]
    return EvalRun(
        model="runs/a/final",
        data="data/val.jsonl",
        config={"tasks": tasks, "metrics": None, "batch_size": 64, "seed": 0, "samples": 1},
        fingerprints={
            "model_sha256": "ab" * 32,
            "model_hashed": "files",
            "model_files": 1,
            "data_sha256": "cd" * 32,
            "data_files": 3,
        },  # fmt: skip
        metrics=metrics,
        confusion={"digit": (["0", "1", "2"], torch.tensor([[3, 1, 0], [0, 2, 0], [1, 0, 4]]))},
        samples=["digit: 1.png -> 1 (0.90)"],
        generated={"gen": Generated(images, ["0", "0", "1", "1"], [True, False, True, True])},
    )


METRICS = {
    "val/digit/loss": 0.5,
    "val/digit/top1": 0.8181818,
    "val/digit/accuracy/0": 0.75,
    "val/image_text/r1_image_to_text": 0.5,
    "val/image_text/r5_image_to_text": 0.75,
    "val/image_text/r10_image_to_text": 1.0,
    "val/image_text/median_rank_image_to_text": 2.0,
    "val/gen/judged_accuracy": 0.75,
    "val/chat/reply_accuracy": 0.5,
    "val/chat/reply_accuracy/count": 0.25,
    "val/chat/reply_accuracy/shade": 0.75,
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    run = make_run(METRICS)
    folder = tmp_path_factory.mktemp("report")
    return run, folder, write_report(run, folder / "eval")


def test_eval_json_round_trips(written):
    run, _, files = written
    loaded = load_report(files[0])
    assert loaded == report_of(run, loaded["figures"])
    assert loaded == load_report(files[0].parent)  # the folder works as well as the file
    assert loaded["metrics"] == METRICS and loaded["confusion"]["digit"]["matrix"][2] == [1, 0, 4]


def test_eval_md_holds_every_metric_under_its_task(written):
    _, _, files = written
    text = (files[0].parent / "eval.md").read_text()
    for key, value in METRICS.items():
        _, task, name = key.split("/", 2)
        assert f"| {name} | {format_value(value)} |" in text.split(f"## {task} (")[1].split("\n## ")[0], key
    assert "digit: 1.png -> 1 (0.90)" in text and "![confusion_digit.png](confusion_digit.png)" in text


def test_figures_are_valid_pngs(written):
    _, folder, files = written
    names = {p.name for p in files}
    assert {"confusion_digit.png", "recall.png", "qa_chat.png", "samples_gen.png"} <= names
    assert json.loads((folder / "eval" / "eval.json").read_text())["figures"] == [
        p.name for p in files if p.suffix == ".png"
    ]
    for path in files:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG
            with Image.open(path) as image:
                image.verify()


def test_compare_lists_every_metric_of_every_run_and_marks_what_a_run_lacks(written, tmp_path, capsys):
    _, folder, _ = written
    other = {k: v - 0.125 for k, v in METRICS.items() if "chat" not in k} | {"val/digit/top5": 1.0}
    write_report(make_run(other, chat=False), tmp_path / "b")
    text = compare_runs([folder / "eval", tmp_path / "b" / "eval.json"], tmp_path / "cmp")
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in text.splitlines() if line.startswith("| val/")}
    assert rows.keys() == METRICS.keys() | {"val/digit/top5"}
    assert rows["val/digit/top1"] == "| val/digit/top1 | 0.8182 | 0.6932 | -0.1250 |"
    assert rows["val/chat/reply_accuracy"].endswith("| 0.5000 | - | - |")
    assert rows["val/digit/top5"] == "| val/digit/top5 | - | 1.0000 | - |"
    lacks = [line for line in text.splitlines() if "lacks" in line]
    assert lacks[0].startswith(f"{folder / 'eval'} lacks 1: val/digit/top5")
    assert lacks[1].startswith(f"{tmp_path / 'b'} lacks 3: val/chat/reply_accuracy,")
    assert (tmp_path / "cmp" / "compare.md").read_text().endswith(text)
    assert (tmp_path / "cmp" / "recall.png").read_bytes()[:8] == PNG
    assert main(["eval", "--compare", str(folder / "eval"), str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out == text


def test_compare_refuses_what_is_not_an_eval_json(written, tmp_path, capsys):
    _, folder, _ = written
    (tmp_path / "metrics.json").write_text('{"val/x/loss": 1.0}')
    (tmp_path / "broken.json").write_text("{")
    for bad, problem in [
        (tmp_path / "metrics.json", 'is not an eval.json written by mmfm eval \\(no "format": "mmfm-eval"\\)'),
        (tmp_path / "broken.json", "is not an eval.json written by mmfm eval"),
        (tmp_path / "none.json", "no such file"),
        (tmp_path, "holds no eval.json"),
    ]:
        with pytest.raises(InputError, match=problem):
            compare_runs([folder / "eval", bad])
    with pytest.raises(InputError, match="at least two runs"):
        compare_runs([folder / "eval"])
    assert main(["eval", "--compare", str(folder / "eval"), "--model", "mmfm-test"]) == 2
    assert "takes no --model" in capsys.readouterr().err


def test_a_bad_out_fails_before_anything_is_written(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    run = make_run(METRICS)
    with pytest.raises(InputError, match=r"it is a file; name a folder, or a file ending in \.json"):
        write_report(run, blocker)
    with pytest.raises(InputError, match=rf"\({blocker} is a file, not a folder\)"):
        write_report(run, blocker / "eval.json")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(InputError, match="it is a folder; name a file"):
        write_report(run, tmp_path / "dir.json")
    assert blocker.read_text() == "keep me"


def test_the_printed_table_groups_a_task_s_metrics_and_shows_the_weakest_classes():
    metrics = {
        "val/cap/loss": 0.5,
        "val/digit/loss": 0.25,
        **{f"val/cap/bleu_{n}": 1 - n / 10 for n in (1, 2, 3, 4)},
        "val/cap/cider_d": 2.5,
        **{f"val/digit/accuracy/{c}": a for c, a in zip("abcde", (0.9, 0.5, 1.0, 0.7, 0.6))},
        **{f"val/it/r{k}_image_to_text": k / 10 for k in (1, 5, 10)},
        "val/it/median_rank_image_to_text": 18.5,
        **{f"val/it/label_r{k}_image_to_text": 1.0 for k in (1, 5)},
        "val/chat/reply_accuracy/count": 0.75,
    }
    assert metrics_table(metrics).splitlines() == [
        "task   metric                           value",
        "cap    loss                             0.5000",
        "       bleu_1/2/3/4                     0.9000 0.8000 0.7000 0.6000",
        "       cider_d                          2.5000",
        "digit  loss                             0.2500",
        "       accuracy/<class>, lowest 3 of 5  b: 0.5000  e: 0.6000  d: 0.7000",
        "it     r1/5/10_image_to_text            0.1000 0.5000 1.0000",
        "       median_rank_image_to_text        18.5",
        "       label_r1/5_image_to_text         1.0000 1.0000",
        "chat   reply_accuracy/<family>          count: 0.7500",
    ]
