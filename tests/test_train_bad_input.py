"""Careless training and evaluation input: a resume that cannot continue the run, an incomplete trainer state, an
out_dir that is a file, `mmfm eval` run twice and its metrics file. Each is one clear error before any work, and
nothing the run wrote is lost."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

import mmfm
from mmfm.cli import main
from mmfm.data import ManifestDataset
from mmfm.errors import CheckpointError, ConfigError
from mmfm.eval import run as run_module
from mmfm.eval.report import write_report
from mmfm.eval.run import evaluate_data
from mmfm.train import TrainConfig, train
from mmfm.train import trainer as trainer_module
from mmfm.train.checkpointing import STATE_NAME, list_checkpoints, load_trainer_state
from mmfm.train.trainer import Trainer

CAPTION_ONLY = [{"name": "cap", "objective": "caption", "inputs": ["image"]}]


def recipe_for(tiny_digits: Path, out_dir: Path, **fields) -> dict:
    return {
        "model": "mmfm-test",
        "data": {"train": str(tiny_digits / "train.jsonl")},
        "tasks": CAPTION_ONLY,
        "steps": 4,
        "batch_size": 8,
        "checkpoint_every": 2,
        "keep_last": 5,
        "out_dir": str(out_dir),
        "log_every": 1,
        "progress": False,
        **fields,
    }


@pytest.fixture(scope="module")
def step4_run(tiny_digits, tmp_path_factory) -> Path:
    """A caption run stopped at step 4 (checkpoints at steps 2 and 4, then final/); copy it before changing it."""
    out = tmp_path_factory.mktemp("step4") / "run"
    train(TrainConfig.from_dict(recipe_for(tiny_digits, out)))
    return out


@pytest.fixture
def run(step4_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(step4_run, copy)
    return copy


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def resume(tiny_digits, run: Path, **fields) -> Path:
    return train(TrainConfig.from_dict(recipe_for(tiny_digits, run, resume=True, **fields)))


def test_resuming_with_fewer_steps_than_the_run_did_is_refused_and_nothing_is_touched(tiny_digits, run):
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"already at step 4\. Pass steps=4 or more.*model=.*step-000004"):
        resume(tiny_digits, run, steps=2)
    assert snapshot(run) == before  # final/ still holds the step-4 model; the step-4 checkpoint is kept


def test_resuming_with_another_batch_size_is_refused(tiny_digits, run):
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"trained with batch_size=8, this run asks for batch_size=16"):
        resume(tiny_digits, run, steps=6, batch_size=16)
    assert snapshot(run) == before


def test_resuming_on_a_smaller_or_larger_manifest_is_refused(tiny_digits, run, tmp_path):
    items = ManifestDataset(tiny_digits / "train.jsonl")
    for name, count in (("small", 12), ("large", len(items) + 1)):
        lines = [
            {"image": items[i % len(items)]["image"], "caption": items[i % len(items)]["caption"]} for i in range(count)
        ]
        manifest = tmp_path / f"{name}.jsonl"
        manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
        with pytest.raises(ConfigError, match=rf"trained on {len(items)} examples, .*{name}.jsonl\) now has {count}"):
            resume(tiny_digits, run, steps=6, data={"train": str(manifest)})


def test_resuming_with_another_grad_accum_and_the_same_batch_size_continues(tiny_digits, run):
    final = resume(tiny_digits, run, steps=5, grad_accum=2)
    assert [p.name for p in list_checkpoints(run)][-1] == "step-000005"
    assert mmfm.load(final) is not None


def test_an_old_checkpoint_past_the_end_of_a_smaller_manifest_is_refused(tiny_digits, run, tmp_path):
    state_file = list_checkpoints(run)[-1] / STATE_NAME
    state = torch.load(state_file, weights_only=True)
    del state["data"]  # as a checkpoint of an earlier release, which did not record its data
    torch.save(state, state_file)
    items = ManifestDataset(tiny_digits / "train.jsonl")
    manifest = tmp_path / "small.jsonl"
    manifest.write_text("".join(json.dumps({"text": items[i]["caption"]}) + "\n" for i in range(16)))
    with pytest.raises(ConfigError, match=r"stopped 4 micro-batches of 8 into an epoch .* only 16 examples"):
        resume(tiny_digits, run, steps=6, data={"train": str(manifest)})


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda s: {"step": s["step"]}, r"incomplete trainer state, it has no 'epoch' .*'optimizer' .*'rng'"),
        (lambda s: [s], r"holds a list, not a trainer state"),
        (lambda s: {**s, "step": -1}, r"'step' \(the optimizer steps done\) is int -1"),
        (lambda s: {**s, "rng": []}, r"'rng' .* is a list of 0"),
        (lambda s: {**s, "rng": [torch.zeros(3)]}, r"'rng' .* is a list of 1"),
        (lambda s: {**s, "optimizer": {"state": {}, "param_groups": []}}, r"does not fit this run \(ValueError"),
    ],
    ids=["no parts", "not a dict", "negative step", "no rng", "float rng", "other optimizer"],
)
def test_an_incomplete_or_foreign_trainer_state_is_a_checkpoint_error_naming_the_file(
    tiny_digits, run, change, problem
):
    state_file = list_checkpoints(run)[-1] / STATE_NAME
    torch.save(change(torch.load(state_file, weights_only=True)), state_file)
    with pytest.raises(CheckpointError, match=rf"{state_file}: .*{problem}"):
        resume(tiny_digits, run, steps=6)


def test_a_trainer_state_that_is_a_folder_is_refused(run):
    checkpoint = list_checkpoints(run)[-1]
    (checkpoint / STATE_NAME).unlink()
    (checkpoint / STATE_NAME).mkdir()
    with pytest.raises(CheckpointError, match="trainer_state.pt: not a regular file"):
        load_trainer_state(checkpoint)


def test_an_out_dir_that_is_a_file_is_refused_before_anything_is_built(tiny_digits, tmp_path, monkeypatch):
    def no_model(config):
        raise AssertionError("the model was built before out_dir was checked")

    monkeypatch.setattr(trainer_module, "model_for_training", no_model)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "metrics.csv").mkdir()
    cases = [
        (notes, rf"out_dir {notes}: is a file, not a folder"),
        (notes / "run", rf"out_dir {notes / 'run'}: {notes} is a file"),
        (tmp_path / "run", r"checkpoints is a file; the run writes its checkpoints there as a folder"),
        (tmp_path / "run2", r"metrics.csv is a folder; the run writes its metrics.csv there as a file"),
        (tmp_path / ("x" * 300), r"not a usable folder name \(File name too long\)"),
    ]
    for out_dir, problem in cases:
        with pytest.raises(ConfigError, match=problem):
            Trainer(TrainConfig.from_dict(recipe_for(tiny_digits, out_dir)))
    assert notes.read_text() == "keep me"


GEN_TASKS = [
    {"name": "cap", "objective": "caption", "inputs": ["image"]},
    {"name": "gen", "objective": "image_gen", "inputs": ["text"]},
]


@pytest.fixture(scope="module")
def gen_model(tmp_path_factory):
    """(model folder, recipe): an untrained mmfm-test with a small image_gen head; a recipe with a diffusion task."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gen")
    model = mmfm.create_model("mmfm-test", image_gen={"image_size": 8, "channels": 1})
    model.save_pretrained(folder / "model")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": "mmfm-test", "data": {"train": "x.jsonl"}, "tasks": GEN_TASKS}))
    return folder / "model", recipe


def test_eval_gives_the_same_metrics_twice_and_leaves_the_callers_rng_alone(gen_model, tiny_digits):
    model_dir, recipe = gen_model
    model = mmfm.load(model_dir)
    manifest = tiny_digits / "val.jsonl"
    torch.manual_seed(1)
    first = evaluate_data(model, manifest, model_name=str(model_dir), recipe=recipe).metrics
    after_first = torch.rand(1)
    second = evaluate_data(model, manifest, model_name=str(model_dir), recipe=recipe).metrics
    assert "val/gen/loss" in first
    assert first == second  # the diffusion noise and timesteps are drawn from the same seed each time
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_first)  # the caller's stream is as if nothing had been evaluated
    other = evaluate_data(model, manifest, model_name=str(model_dir), recipe=recipe, seed=1).metrics
    assert other["val/gen/loss"] != first["val/gen/loss"]


def test_eval_out_in_a_missing_folder_is_created_and_a_bad_out_fails_before_computing(
    gen_model, tiny_digits, tmp_path, monkeypatch, capsys
):
    model_dir, recipe = gen_model
    model = mmfm.load(model_dir)
    manifest = tiny_digits / "val.jsonl"
    out = tmp_path / "new" / "deeper" / "metrics.json"
    run = evaluate_data(model, manifest, model_name=str(model_dir), recipe=recipe)
    write_report(run, out)
    assert json.loads(out.read_text())["metrics"] == run.metrics
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temporary file left beside it

    def no_work(*args, **kwargs):
        raise AssertionError("metrics were computed although --out cannot be written")

    monkeypatch.setattr(run_module, "evaluate_tasks", no_work)
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    (tmp_path / "folder.json").mkdir()
    cases = [
        (tmp_path / "folder.json", rf"--out {tmp_path / 'folder.json'}: cannot write the metrics \(it is a folder"),
        (blocker, rf"--out {blocker}: cannot write the report \(it is a file; name a folder, or a file ending"),
        (blocker / "metrics.json", rf"--out {blocker / 'metrics.json'}: .* \({blocker} is a file, not a folder\)"),
    ]
    args = ["eval", "--model", str(model_dir), "--data", str(manifest), "--config", str(recipe), "--out"]
    for bad, problem in cases:
        start = time.perf_counter()
        assert main([*args, str(bad)]) == 2
        assert re.search(problem, capsys.readouterr().err)
        assert time.perf_counter() - start < 1
    assert blocker.read_text() == "keep me"


def test_the_command_line_reports_each_as_one_error_line(tiny_digits, run, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(tiny_digits, run)))
    state_file = list_checkpoints(run)[-1] / STATE_NAME
    cases = [
        (["resume=true", "steps=2"], "already at step 4"),
        (["resume=true", "batch_size=16", "steps=6"], "trained with batch_size=8"),
        ([f"out_dir={recipe}"], "is a file, not a folder"),
    ]
    for overrides, problem in cases:
        assert main(["train", str(recipe), *overrides]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mmfm: error: ") and problem in err and len(err.strip().splitlines()) == 1, err
    torch.save({"step": 4}, state_file)
    assert main(["train", str(recipe), "resume=true", "steps=6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmfm: error: {state_file}: incomplete trainer state") and "Traceback" not in err


def test_mmfm_eval_prints_the_same_metrics_twice(gen_model, tiny_digits, capsys):
    model_dir, recipe = gen_model
    args = ["eval", "--model", str(model_dir), "--data", str(tiny_digits / "val.jsonl"), "--config", str(recipe)]
    outputs = []
    for _ in range(2):
        assert main(args) == 0
        outputs.append(capsys.readouterr().out)
    assert re.search(r"^gen +loss ", outputs[0], re.M) and outputs[0] == outputs[1]
