"""mmfm's own checkpoints: bit-exact round trips, sharding, and clear errors for every broken checkpoint."""

import pickle

import numpy as np
import pytest
import torch

import mmfm
from mmfm.checkpoint import INDEX_NAME, WEIGHTS_NAME, save_pretrained
from mmfm.errors import CheckpointError


def _outputs(model):
    image = [np.linspace(0, 1, 40 * 48 * 3, dtype=np.float32).reshape(40, 48, 3)]
    audio = [(np.sin(np.linspace(0, 400, 16000, dtype=np.float32)), 16000)]
    return (
        model.embed(images=image),
        model.embed(audio=audio),
        model.embed(text=["a red square"]),
        model.classify(images=image).probs,
        model.caption(images=image, max_new_tokens=8),
    )


def test_save_then_load_gives_bit_identical_outputs(saved):
    model, directory = saved
    loaded = mmfm.load(directory)
    assert not loaded.training
    for a, b in zip(_outputs(model), _outputs(loaded)):
        assert a == b if isinstance(a, list) else torch.equal(a, b)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_tied_weights_stay_tied_after_loading(saved):
    loaded = mmfm.load(saved[1])
    assert loaded.heads["caption"].lm_head.weight is loaded.token_embedding.weight


def test_checkpoint_holds_config_and_safetensors_only(saved):
    files = sorted(p.name for p in saved[1].iterdir())
    assert files == ["config.yaml", WEIGHTS_NAME]


def test_sharded_checkpoint_loads_the_same_weights(saved, tmp_path):
    model, _ = saved
    save_pretrained(model, tmp_path, max_shard_bytes=64 * 1024)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / INDEX_NAME).exists() and not (tmp_path / WEIGHTS_NAME).exists()
    loaded = mmfm.load(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    save_pretrained(model, tmp_path)  # re-saving unsharded into the same directory removes the stale shards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", WEIGHTS_NAME]


def test_missing_files_are_named(saved, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        mmfm.load(tmp_path / "absent")
    (tmp_path / WEIGHTS_NAME).write_bytes((saved[1] / WEIGHTS_NAME).read_bytes())
    with pytest.raises(CheckpointError, match="no config.yaml"):
        mmfm.load(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    (tmp_path / "config.yaml").write_text((saved[1] / "config.yaml").read_text())
    with pytest.raises(CheckpointError, match=f"no {WEIGHTS_NAME}"):
        mmfm.load(tmp_path)


def test_truncated_weights_are_reported_with_the_file(saved, tmp_path):
    (tmp_path / "config.yaml").write_text((saved[1] / "config.yaml").read_text())
    data = (saved[1] / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot be read as safetensors; truncated"):
        mmfm.load(tmp_path)


def test_pickled_weights_are_never_unpickled(saved, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "config.yaml").write_text((saved[1] / "config.yaml").read_text())
    (tmp_path / WEIGHTS_NAME).write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        mmfm.load(tmp_path)
    assert not marker.exists()


def test_weights_of_another_architecture_list_every_problem_at_once(saved, tmp_path):
    other = mmfm.create_model("mmfm-test", backbone={"depth": 3, "dim": 96, "num_heads": 4})
    other.save_pretrained(tmp_path)
    (tmp_path / "config.yaml").write_text((saved[1] / "config.yaml").read_text())
    with pytest.raises(CheckpointError) as e:
        mmfm.load(tmp_path)
    message = str(e.value)
    assert "mis-shaped keys" in message and "backbone.blocks.0.attn.qkv.weight: checkpoint" in message
    assert "unexpected keys" in message and "backbone.blocks.2." in message
    assert str(tmp_path) in message


def test_non_strict_loading_accepts_missing_and_extra_keys_but_not_wrong_shapes(saved, tmp_path):
    no_classifier = mmfm.create_model("mmfm-test", classify=None)
    no_classifier.save_pretrained(tmp_path)
    (tmp_path / "config.yaml").write_text((saved[1] / "config.yaml").read_text())
    with pytest.raises(CheckpointError, match=r"missing keys \(2\): heads.classify.fc.bias, heads.classify.fc.weight"):
        mmfm.load(tmp_path)
    loaded = mmfm.load(tmp_path, strict=False)
    torch.testing.assert_close(loaded.backbone.norm.weight, no_classifier.backbone.norm.weight)
