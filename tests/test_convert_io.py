"""read_state_dict: safetensors and weights_only torch files, memory-mapped, unwrapped, and never unpickled."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from mmfm.convert.io import read_hf_state_dict, read_state_dict
from mmfm.errors import CheckpointError

STATE = {"blocks.0.weight": torch.arange(12.0).reshape(3, 4), "blocks.0.bias": torch.ones(3, dtype=torch.float16)}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


class Exploit:
    """Unpickling this creates `marker`: the proof that a file was unpickled with the full pickle machinery."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt", "w.bin", "w.pth", "w.ckpt"])
def test_formats_read_back_exactly_and_memory_mapped(tmp_path, name, memory_mapped_from):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(STATE, path)
    else:
        torch.save(STATE, path)
    state = read_state_dict(path)
    assert _equal(state, STATE)
    assert memory_mapped_from(path, state["blocks.0.weight"])


def test_format_is_sniffed_when_the_suffix_says_nothing(tmp_path):
    save_file(STATE, tmp_path / "a.weights")
    torch.save(STATE, tmp_path / "b.weights")
    assert _equal(read_state_dict(tmp_path / "a.weights"), STATE)
    assert _equal(read_state_dict(tmp_path / "b.weights"), STATE)
    (tmp_path / "c.weights").write_bytes(b"hello, not weights")
    with pytest.raises(CheckpointError, match=r"c.weights: unrecognised weights format"):
        read_state_dict(tmp_path / "c.weights")


def test_legacy_torch_format_reads_without_mmap(tmp_path):
    torch.save(STATE, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert _equal(read_state_dict(tmp_path / "old.pt"), STATE)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"state_dict": s, "epoch": 3, "optimizer": {"lr": 0.1}},
        lambda s: {"model": s, "step": 10},
        lambda s: {"module." + k: v for k, v in s.items()},  # DistributedDataParallel
        lambda s: {"state_dict": {"module." + k: v for k, v in s.items()}, "epoch": 1},
    ],
    ids=["state_dict", "model", "ddp_prefix", "both"],
)
def test_training_containers_are_unwrapped(tmp_path, wrap):
    torch.save(wrap(STATE), tmp_path / "ckpt.pt")
    assert _equal(read_state_dict(tmp_path / "ckpt.pt"), STATE)


def test_non_tensor_entries_are_listed(tmp_path):
    torch.save({**STATE, "epoch": 3, "note": "x"}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"mixed.pt: entries that are not tensors \(2\): epoch, note"):
        read_state_dict(tmp_path / "mixed.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list.pt: expected a dict of tensors, found a list"):
        read_state_dict(tmp_path / "list.pt")


@pytest.mark.parametrize(
    "writer, stopped_at",
    [("torch_save", "Unsupported global: GLOBAL io.open"), ("pickle_2", "Unsupported global"), ("pickle_5", "")],
)
@pytest.mark.parametrize("name", ["evil.pt", "evil.bin", "evil.pth", "evil.ckpt"])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, writer, stopped_at, name):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    if writer == "torch_save":
        torch.save({"weight": Exploit(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"weight": Exploit(marker)}, protocol=int(writer[-1])))
    with pytest.raises(CheckpointError, match=rf"{name}: refusing to unpickle: .* stopped at '{stopped_at}") as e:
        read_state_dict(path)
    assert "could run code" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
def test_truncated_files_are_reported_as_truncated_or_corrupt(tmp_path, name):
    path = tmp_path / name
    big = {"w": torch.randn(64, 64)}
    save_file(big, path) if name.endswith(".safetensors") else torch.save(big, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{name}: .*truncated or corrupt\?"):
        read_state_dict(path)


def test_missing_file_and_directory_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"absent.pt: no such weights file"):
        read_state_dict(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match=r"no such weights file \(it is a directory\)"):
        read_state_dict(tmp_path)


def test_hf_directory_prefers_safetensors_and_reads_shards(tmp_path):
    torch.save({"x": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    save_file(STATE, tmp_path / "model.safetensors")
    state, origin = read_hf_state_dict(tmp_path)
    assert _equal(state, STATE) and origin.name == "model.safetensors"

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"blocks.0.weight": STATE["blocks.0.weight"]}, sharded / "model-00001-of-00002.safetensors")
    save_file({"blocks.0.bias": STATE["blocks.0.bias"]}, sharded / "model-00002-of-00002.safetensors")
    weight_map = {
        "blocks.0.weight": "model-00001-of-00002.safetensors",
        "blocks.0.bias": "model-00002-of-00002.safetensors",
    }
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    state, origin = read_hf_state_dict(sharded)
    assert _equal(state, STATE) and origin.name == "model.safetensors.index.json"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        CheckpointError, match=r"empty: no weights file in this directory \(looked for model.safetensors"
    ):
        read_hf_state_dict(empty)
