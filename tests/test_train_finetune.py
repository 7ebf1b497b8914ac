"""Transfer tools: LoRA through peft (what trains, adapter-only save/load, merge), optimizer groups, schedule, mixer."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import mmfm
from mmfm.data import Collator, ManifestDataset
from mmfm.train import TrainConfig, load_adapter, merge_lora, save_adapter, train
from mmfm.train.config import LoraConfig, OptimConfig, TaskConfig
from mmfm.train.finetune import apply_lora, has_lora
from mmfm.train.mixer import TaskMixer
from mmfm.train.optim import param_groups, warmup_cosine


def caption_batch(model, manifest):
    items = ManifestDataset(manifest)
    return Collator.from_model(model)([items[i] for i in range(8)])


def test_lora_trains_only_adapters_and_heads_and_exports_adapters_and_a_merged_model(make_recipe, tmp_path):
    recipe = make_recipe("lora", steps=4, optim={"lr": 1e-2, "warmup_steps": 1}, finetune={"lora": {"rank": 4}})
    final = train(TrainConfig.from_file(recipe))
    torch.manual_seed(0)  # the trainer seeds with config.seed before building the model
    init = mmfm.create_model("mmfm-test").state_dict()
    weights = load_file(final / "model.safetensors")
    assert set(weights) <= set(init) and not any("lora" in k for k in weights)  # merged: plain keys
    assert mmfm.load(final) is not None
    merged_into = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(weights[merged_into], init[merged_into])  # the adapter's update was folded in
    assert torch.equal(weights["backbone.blocks.0.attn_norm.weight"], init["backbone.blocks.0.attn_norm.weight"])
    vit_qkv = "encoders.image.vit.blocks.0.attn.qkv.weight"
    assert not torch.equal(weights[vit_qkv], init[vit_qkv])  # encoders were not adapted, so they trained fully
    assert not torch.equal(weights["heads.classify.fc.weight"], init["heads.classify.fc.weight"])
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k and k.startswith("backbone.blocks.") for k in adapter)
    backbone_size = sum(v.numel() for k, v in init.items() if k.startswith("backbone."))
    assert sum(v.numel() for v in adapter.values()) < 0.2 * backbone_size


def test_adapter_save_load_and_merge_round_trip(tiny_digits, tmp_path):
    torch.manual_seed(0)
    model = mmfm.create_model("mmfm-test").eval()
    config = LoraConfig(rank=2, alpha=4.0, encoders=True)
    apply_lora(model, config)
    assert has_lora(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # peft starts B at zero; make the adapters do something
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoders.image.") and "lora_" in n for n in trainable)
    assert not any(n.endswith("base_layer.weight") for n in trainable)
    batch = caption_batch(model, tiny_digits / "val.jsonl")
    media = {"image": batch.image}
    with torch.no_grad():
        expected = model.caption_logits(media, batch.caption_ids, batch.caption_mask)
    save_adapter(model, tmp_path / "adapter", config)
    fresh = mmfm.create_model("mmfm-test").eval()
    fresh.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "lora_" not in k and "base_layer" not in k}, strict=False
    )
    for name, module in model.named_modules():  # copy the frozen base weights under their plain names
        if hasattr(module, "base_layer"):
            fresh.get_submodule(name).load_state_dict(module.base_layer.state_dict())
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh.caption_logits(media, batch.caption_ids, batch.caption_mask), expected)
        merge_lora(fresh)
        assert not has_lora(fresh)
        torch.testing.assert_close(
            fresh.caption_logits(media, batch.caption_ids, batch.caption_mask), expected, rtol=1e-4, atol=1e-4
        )
    assert set(fresh.state_dict()) == set(mmfm.create_model("mmfm-test").state_dict())


def test_no_weight_decay_on_norms_biases_embeddings_and_tokens():
    model = mmfm.create_model("mmfm-test")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "backbone.blocks.0.attn.qkv.weight" in decayed
    for name in (
        "backbone.norm.weight",
        "token_embedding.weight",
        "heads.classify.fc.bias",
        "encoders.image.vit.cls_token",
    ):
        assert any(n == name for n in spared) or name not in names.values(), name
    assert "token_embedding.weight" in spared  # tied with the LM head: counted once, as an embedding
    assert not any("norm" in n for n in decayed)
    assert len(decayed) + len(spared) == len({id(p) for p in model.parameters()})


def test_warmup_then_cosine_to_the_floor():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = warmup_cosine(opt, OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1), total_steps=14)
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14] == pytest.approx(0.1)


def test_mixer_follows_ratios_and_replays_after_restore():
    tasks = [TaskConfig("a", "caption", ["image"], ratio=3), TaskConfig("b", "classify", ["image"], ratio=1)]
    mixer = TaskMixer(tasks, seed=0)
    draws = [mixer.sample()[0].name for _ in range(4000)]
    assert abs(draws.count("a") / 4000 - 0.75) < 0.03
    state = mixer.state_dict()
    after = [mixer.sample()[0].name for _ in range(50)]
    again = TaskMixer(tasks, seed=123)
    again.load_state_dict(state)
    assert [again.sample()[0].name for _ in range(50)] == after
    before = torch.get_rng_state()
    TaskMixer(tasks, seed=0).sample()
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is untouched


def test_new_labels_start_a_fresh_classify_head_even_when_as_many(saved):
    from mmfm.loader import for_finetuning

    model, directory = saved
    old = model.heads["classify"].fc.weight
    kept, notes = for_finetuning(directory, {})
    assert torch.equal(kept.heads["classify"].fc.weight, old) and notes == []
    letters = [chr(ord("a") + i) for i in range(len(model.heads["classify"].labels))]  # as many, other meaning
    relabelled, notes = for_finetuning(directory, {"classify": {"labels": letters}})
    assert relabelled.heads["classify"].labels == letters
    assert not torch.equal(relabelled.heads["classify"].fc.weight, old)
    assert "re-initialised (new labels or shape): heads.classify.fc.weight" in notes
    assert torch.equal(relabelled.backbone.norm.weight, model.backbone.norm.weight)  # the rest is kept
