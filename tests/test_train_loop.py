"""The trainer: learning, exact resume, accumulation, signals, run folder contents, fine-tuning and LoRA."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import mmfm
from mmfm.data import ManifestDataset
from mmfm.errors import CheckpointError, ConfigError
from mmfm.train import TrainConfig, train
from mmfm.train.checkpointing import list_checkpoints
from mmfm.train.run_log import read_metrics

TASK_NAMES = ("image_caption", "audio_caption", "digit", "image_text")  # conftest's TRAIN_TASKS


def losses(run_dir) -> list[tuple[int, str, float]]:
    series = read_metrics(run_dir / "metrics.csv")
    return sorted(
        (s, n, v) for n, pts in series.items() if n.endswith("/loss") and n.startswith("train/") for s, v in pts
    )


def test_training_lowers_held_out_loss_and_writes_the_run_folder(make_recipe, tmp_path):
    config = TrainConfig.from_file(make_recipe(steps=40, eval_every=20, checkpoint_every=20, keep_last=1))
    final = train(config)
    run = tmp_path / "run"
    series = read_metrics(run / "metrics.csv")
    for task in ("image_caption", "audio_caption"):
        (first_step, first), *_, (last_step, last) = series[f"val/{task}/loss"]
        assert (first_step, last_step) == (20, 40)
    untrained = mmfm.create_model("mmfm-test")
    trained = mmfm.load(final)
    from mmfm.data import Collator

    items = ManifestDataset(config.data.val)
    batch = Collator.from_model(trained)([items[i] for i in range(len(items))])
    media = {"audio": batch.audio}
    with torch.no_grad():
        before = untrained.caption_loss(media, batch.caption_ids, batch.caption_mask)
        after = trained.caption_loss(media, batch.caption_ids, batch.caption_mask)
    assert after < 0.7 * before
    assert [p.name for p in list_checkpoints(run)] == ["step-000040"]  # keep_last=1 pruned step 20
    assert Image.open(run / "curves.png").size[0] > 500
    assert (run / "train_config.yaml").exists()
    assert {"train/lr", "train/samples_per_s", "val/digit/top1", "val/image_text/r1_image_to_text"} <= set(series)


def test_resumed_run_reproduces_the_uninterrupted_run_exactly(make_recipe, tmp_path):
    straight = train(TrainConfig.from_file(make_recipe("straight", steps=8)))
    recipe = make_recipe("killed", steps=8, checkpoint_every=3, keep_last=5)
    train(TrainConfig.from_file(recipe))
    run = tmp_path / "killed"
    assert [p.name for p in list_checkpoints(run)] == ["step-000003", "step-000006", "step-000008"]
    for later in list_checkpoints(run)[1:]:  # as if the run had died between steps 3 and 6
        shutil.rmtree(later)
    shutil.rmtree(run / "final")
    resumed = train(TrainConfig.from_file(recipe, {"resume": True}))
    assert losses(tmp_path / "straight") == losses(run)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_existing_run_is_not_overwritten_without_resume(make_recipe):
    recipe = make_recipe(steps=2)
    train(TrainConfig.from_file(recipe))
    with pytest.raises(ConfigError, match="resume=true"):
        train(TrainConfig.from_file(recipe))


def test_gradient_accumulation_matches_one_big_batch(make_recipe, tmp_path):
    caption_only = [{"name": "cap", "objective": "caption", "inputs": ["image"]}]
    train(TrainConfig.from_file(make_recipe("one", tasks=caption_only, steps=4)))
    train(TrainConfig.from_file(make_recipe("accum", tasks=caption_only, steps=4, grad_accum=4)))
    one, accum = losses(tmp_path / "one"), losses(tmp_path / "accum")
    assert [s for s, _, _ in one] == [s for s, _, _ in accum]
    torch.testing.assert_close([v for *_, v in one], [v for *_, v in accum], rtol=1e-5, atol=1e-5)


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(make_recipe, tmp_path):
    recipe = make_recipe("signalled", steps=400)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmfm", "train", str(recipe)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    metrics = tmp_path / "signalled" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert "resume=true" in err.decode()
    (checkpoint,) = list_checkpoints(tmp_path / "signalled")
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 0 < stopped_at < 400
    assert (tmp_path / "signalled" / "curves.png").is_file()  # drawn when the signal stopped the run
    final = train(TrainConfig.from_file(recipe, {"resume": True, "steps": stopped_at + 2}))
    assert mmfm.load(final) is not None
    steps = [s for s, _, _ in losses(tmp_path / "signalled")]
    assert steps == list(range(1, stopped_at + 3))  # no step lost or repeated


def test_unknown_recipe_key_and_bad_task_are_named(make_recipe):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.warmup_step'.*did you mean 'optim.warmup_steps'"):
        TrainConfig.from_file(make_recipe(optim={"warmup_step": 1}))
    with pytest.raises(ConfigError, match=r"tasks\[0\].*two different inputs"):
        TrainConfig.from_file(make_recipe(tasks=[{"name": "x", "objective": "contrastive", "inputs": ["image"]}]))
    with pytest.raises(ConfigError, match="override 'steps' is not KEY=VALUE|steps must be positive"):
        TrainConfig.from_file(make_recipe(), {"steps": 0})
    no_gen = make_recipe(
        model_overrides={"image_gen": None}, tasks=[{"name": "g", "objective": "image_gen", "inputs": ["text"]}]
    )
    config = TrainConfig.from_file(no_gen)
    with pytest.raises(ConfigError, match="needs the model's 'image_gen' head"):
        train(config)


def test_fine_tuning_a_saved_model_with_new_labels_and_frozen_groups(make_recipe, tiny_digits, tmp_path):
    base = train(TrainConfig.from_file(make_recipe("base", steps=2)))
    digits = ManifestDataset(tiny_digits / "train.jsonl")
    with open(tmp_path / "parity.jsonl", "w") as f:
        for i in range(len(digits)):
            item = digits[i]
            f.write(json.dumps({"image": item["image"], "label": "odd" if int(item["label"]) % 2 else "even"}) + "\n")
    recipe = make_recipe(
        "tuned",
        model=str(base),
        model_overrides={"classify": {"labels": ["even", "odd"]}},
        tasks=[{"name": "parity", "objective": "classify", "inputs": ["image"]}],
        steps=3,
        data={"train": str(tmp_path / "parity.jsonl")},
        finetune={"freeze": ["encoders", "backbone"]},
    )
    final = train(TrainConfig.from_file(recipe))
    before, after = load_file(base / "model.safetensors"), load_file(final / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoders.", "backbone.")))
    assert not torch.equal(before["projectors.image.proj.0.weight"], after["projectors.image.proj.0.weight"])
    assert after["heads.classify.fc.weight"].shape[0] == 2
    assert mmfm.load(final).heads["classify"].labels == ["even", "odd"]
    with pytest.raises(ConfigError, match=r"unknown group\(s\) \['backbones'\].*backbone"):
        train(TrainConfig.from_file(make_recipe("bad", finetune={"freeze": ["backbones"]})))


def test_truncated_trainer_state_is_a_clear_error(make_recipe, tmp_path):
    recipe = make_recipe(steps=2, checkpoint_every=1)
    train(TrainConfig.from_file(recipe))
    state = list_checkpoints(tmp_path / "run")[-1] / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="trainer_state.pt.*truncated or corrupt"):
        train(TrainConfig.from_file(recipe, {"resume": True, "steps": 4}))


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "configs" / "train").glob("*.yaml")), ids=str)
def test_shipped_recipes_are_valid(recipe):
    config = TrainConfig.from_file(recipe)
    assert config.tasks and config.data.train


def test_shipped_recipes_find_the_repositorys_data_and_runs_from_any_working_directory(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parents[1]  # what `make demo` writes: data/digits, runs/demo
    monkeypatch.chdir(tmp_path)
    demo = TrainConfig.from_file(root / "configs" / "train" / "demo.yaml")
    assert Path(demo.model) == root / "configs" / "models" / "mmfm-tiny-digits-gen.yaml" and Path(demo.model).is_file()
    assert (demo.data.train, demo.data.val) == (
        str(root / "data/digits/train.jsonl"),
        str(root / "data/digits/val.jsonl"),
    )
    assert demo.out_dir == str(root / "runs" / "demo")
    probe = TrainConfig.from_file(root / "configs" / "train" / "linear_probe.yaml")
    assert probe.model == str(root / "runs" / "demo" / "final") and probe.data.train == demo.data.train


@pytest.mark.parametrize(
    ("model", "beside"),
    [("mmfm-test", False), ("hf-hub:org/name", False), ("m.yaml", True), ("sub/saved", True), ("saved", True)],
)
def test_a_recipes_model_is_a_path_beside_it_only_when_it_looks_like_or_names_one(model, beside, tmp_path):
    (tmp_path / "recipes" / "saved").mkdir(parents=True)
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text(f"model: {model}\ndata: {{train: t.jsonl}}\ntasks: [{{name: c, objective: caption}}]\n")
    config = TrainConfig.from_file(recipe)
    assert config.model == (str(tmp_path / "recipes" / model) if beside else model)


def test_contrastive_loss_uses_only_rows_with_both_modalities(tiny_digits):
    from mmfm.data import Collator
    from mmfm.train.config import TaskConfig
    from mmfm.train.objectives import build_objective

    torch.manual_seed(0)
    model = mmfm.create_model("mmfm-test")
    items = ManifestDataset(tiny_digits / "train.jsonl")
    full = [items[i] for i in range(6)]
    partial = [dict(item) for item in full]
    for item in partial[4:]:
        del item["caption"], item["captions"]  # two images without text
    objective = build_objective(TaskConfig("it", "contrastive", ["image", "text"]), model)
    collate = Collator.from_model(model)
    kept = objective.loss_sum(model, collate(full[:4])) / 4
    mixed = collate(partial)
    assert int(objective.units(mixed)) == 4
    loss = objective.loss_sum(model, mixed) / 4
    torch.testing.assert_close(loss, kept)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_mixing_all_trains_every_task_on_every_step(make_recipe, tmp_path):
    train(TrainConfig.from_file(make_recipe(steps=3, mixing="all")))
    logged = losses(tmp_path / "run")
    for step in (1, 2, 3):
        assert sorted(n for s, n, _ in logged if s == step) == sorted(f"train/{t}/loss" for t in TASK_NAMES)


def test_tensorboard_events_and_gradient_checkpointing(make_recipe, tmp_path):
    plain = train(TrainConfig.from_file(make_recipe("plain", steps=2)))
    checkpointed = train(TrainConfig.from_file(make_recipe("ckpt", steps=2, grad_checkpointing=True, tensorboard=True)))
    assert list((tmp_path / "ckpt" / "tensorboard").glob("events.out.tfevents.*"))
    a, b = load_file(plain / "model.safetensors"), load_file(checkpointed / "model.safetensors")
    for key in a:  # recomputing activations in backward changes nothing but memory
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_eval_max_items_limits_the_held_out_examples(make_recipe, tmp_path, monkeypatch):
    from mmfm.train import trainer as trainer_module

    seen = []
    real = trainer_module.evaluate

    def spy(model, objectives, loader):
        seen.append(sum(len(batch) for batch in loader))
        return real(model, objectives, loader)

    monkeypatch.setattr(trainer_module, "evaluate", spy)
    train(TrainConfig.from_file(make_recipe(steps=1, eval_max_items=3)))
    assert seen == [3]
