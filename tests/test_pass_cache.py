"""Tasks of one training step share encoder and backbone passes over equal inputs; losses and gradients stay."""

from __future__ import annotations

import pytest
import torch

import mmfm
from mmfm.data import Collator, ManifestDataset
from mmfm.train.config import TaskConfig
from mmfm.train.objectives import build_objective

TASKS = [
    TaskConfig("image_classify", "classify", ["image"]),
    TaskConfig("image_text", "contrastive", ["image", "text"]),
    TaskConfig("audio_classify", "classify", ["audio"]),
    TaskConfig("text_to_image", "image_gen", ["text"]),
    TaskConfig("audio_to_image", "image_gen", ["audio"]),
    TaskConfig("image_caption", "caption", ["image"]),
]


@pytest.fixture()
def setup(tiny_digits):
    torch.manual_seed(0)
    model = mmfm.create_model("mmfm-test", image_gen={"image_size": 8, "channels": 1})
    items = ManifestDataset(tiny_digits / "train.jsonl")
    batch = Collator.from_model(model)([items[i] for i in range(6)])
    return model, batch, [build_objective(t, model) for t in TASKS]


def calls(module: torch.nn.Module) -> list[int]:
    """A counter (a one-item list) of the module's forward calls."""
    count = [0]
    module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def step(model, batch, objectives, seed: int) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Every task's summed loss and the gradients of their sum, with the diffusion noise drawn from `seed`."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    sums = [objective.loss_sum(model, batch) for objective in objectives]
    sum(sums).backward()
    return [s.detach() for s in sums], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_shared_passes_give_the_same_losses_and_gradients_with_fewer_passes(setup):
    model, batch, objectives = setup
    model.train()
    image_encoder, audio_encoder, backbone = (
        calls(m) for m in (model.encoders["image"], model.encoders["audio"], model.backbone)
    )
    plain_losses, plain_grads = step(model, batch, objectives, seed=1)
    plain_calls = image_encoder[0], audio_encoder[0], backbone[0]
    with model.reusing_passes() as cache:
        shared_losses, shared_grads = step(model, batch, objectives, seed=1)
    shared_calls = image_encoder[0] - plain_calls[0], audio_encoder[0] - plain_calls[1], backbone[0] - plain_calls[2]

    # images: classify, contrastive, caption -> one encoder pass; audio: classify, denoise -> one
    # backbone: image (classify + contrastive), audio (classify + denoise), text (contrastive + denoise),
    # image + caption: 4 passes instead of 7
    assert plain_calls == (3, 2, 7) and shared_calls == (1, 1, 4) and cache.hits == 6
    torch.testing.assert_close(shared_losses, plain_losses, rtol=1e-5, atol=1e-6)
    assert shared_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert model._pass_cache is None  # the memo lives only within the block


def test_different_inputs_and_gradient_modes_are_not_shared(setup):
    model, batch, _ = setup
    encoder = calls(model.encoders["image"])
    with model.reusing_passes() as cache:
        first = model.media_tokens("image", batch.image)
        flipped = model.media_tokens("image", batch.image.flip(-1))
        with torch.no_grad():
            no_grad = model.media_tokens("image", batch.image)
        again = model.media_tokens("image", batch.image.clone())
        with model.reusing_passes() as inner:  # a nested block reads the outer memo
            nested = model.media_tokens("image", batch.image)
    assert encoder[0] == 3 and cache.hits == 2 and inner is cache
    assert again is first and nested is first and not torch.equal(flipped, first)
    assert first.requires_grad and not no_grad.requires_grad
