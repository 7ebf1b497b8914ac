"""A few seconds of training teach the image_gen head to follow its condition, and guidance strengthens it."""

from __future__ import annotations

import numpy as np
import torch

import mmfm


def test_generated_images_follow_the_text_condition():
    torch.manual_seed(0)
    image_gen = {"image_size": 8, "prediction_type": "v_prediction", "cond_dropout": 0.2}
    model = mmfm.create_model("mmfm-test", image_gen=image_gen)
    names = ["black", "white"] * 4
    ids, mask = model.tokenizer(names, model.config.text.max_length)
    target = torch.stack([torch.full((3, 8, 8), -1.0 if n == "black" else 1.0) for n in names])  # (8, 3, 8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(100):
        loss = model.image_gen_loss(None, ids, mask, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    means = {}
    for guidance in (1.0, 3.0):
        images = model.generate_image(text=["black", "white"], num_images=4, guidance_scale=guidance, seed=0)
        brightness = np.array([np.asarray(im, dtype=np.float32).mean() for im in images])  # 0..255
        means[guidance] = black, white = brightness[:4], brightness[4:]
        assert black.max() < 100 and white.min() > 155, (guidance, brightness)
    contrast = {g: white.mean() - black.mean() for g, (black, white) in means.items()}
    assert contrast[3.0] > contrast[1.0]


def test_the_trainer_trains_text_and_sound_to_image_beside_the_other_tasks(make_recipe, tmp_path):
    from mmfm.train import TrainConfig, train
    from mmfm.train.run_log import read_metrics

    tasks = [
        {"name": "image_text", "objective": "contrastive", "inputs": ["image", "text"]},
        {"name": "audio_classify", "objective": "classify", "inputs": ["audio"]},
        {"name": "text_to_image", "objective": "image_gen", "inputs": ["text"]},
        {"name": "audio_to_image", "objective": "image_gen", "inputs": ["audio"]},
    ]
    overrides = {"image_gen": {"image_size": 8, "channels": 1}}
    recipe = make_recipe(steps=3, tasks=tasks, mixing="all", model_overrides=overrides, checkpoint_every=0)
    final = train(TrainConfig.from_file(recipe))
    series = read_metrics(tmp_path / "run" / "metrics.csv")
    for task in ("text_to_image", "audio_to_image"):
        assert [step for step, _ in series[f"train/{task}/loss"]] == [1, 2, 3]
        assert 0 < series[f"val/{task}/loss"][-1][1] < 10
    torch.manual_seed(0)  # the recipe's seed: the trainer's initial weights
    untrained = mmfm.create_model("mmfm-test", **overrides).heads["image_gen"].denoiser.state_dict()
    trained = mmfm.load(final).heads["image_gen"].denoiser.state_dict()
    # three AdamW steps of lr <= 3e-3 move each weight by at most about 1e-2, and they moved the denoiser
    change = max(float((trained[k] - untrained[k]).abs().max()) for k in untrained)
    assert 0 < change < 1.5e-2
