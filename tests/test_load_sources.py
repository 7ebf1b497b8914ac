"""mmfm.load from a directory, a weights file, a pretrained tag and a hub id; meta-device loading; safety; CLI."""

import hashlib
import json
import pickle
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mmfm
from mmfm.checkpoint import WEIGHTS_NAME, unique_state_dict
from mmfm.cli import main as cli
from mmfm.convert import Converted
from mmfm.convert.io import read_state_dict
from mmfm.errors import CheckpointError, InputError
from mmfm.loader import build_from_weights, from_converted
from mmfm.pretrained import PretrainedEntry, get_pretrained, register_pretrained, unregister_pretrained


@pytest.fixture(scope="module")
def ast_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.ASTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        num_mel_bins=32,
        max_length=64,
    )
    directory = tmp_path_factory.mktemp("hf_ast")
    transformers.ASTModel(config).save_pretrained(directory)
    return directory


@pytest.fixture
def tag():
    """Registers test tags and removes them afterwards."""
    names = []

    def add(**fields):
        names.append(fields["tag"])
        return register_pretrained(PretrainedEntry(**fields))

    yield add
    for name in names:
        unregister_pretrained(name)


class Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---- meta-device loading ----


def test_loading_takes_the_memory_mapped_tensors_and_keeps_buffers_and_ties(saved, memory_mapped_from):
    model, directory = saved
    loaded = mmfm.load(directory)

    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    weight = loaded.backbone.blocks[0].attn.qkv.weight
    assert memory_mapped_from((directory / WEIGHTS_NAME).resolve(), weight)  # assigned, not copied
    assert weight.requires_grad and not loaded.training
    assert loaded.heads["caption"].lm_head.weight is loaded.token_embedding.weight
    for (name, a), b in zip(model.named_buffers(), loaded.buffers()):  # RoPE tables are not in the checkpoint
        assert torch.equal(a, b), name
    _same_weights(model, loaded)


def test_models_built_in_other_threads_while_one_loads_are_real(saved):
    from mmfm.checkpoint import parameters_on_meta

    _, directory = saved
    start, results = threading.Barrier(2), {}

    def build_normally() -> None:
        start.wait()
        results["built"] = [mmfm.create_model("mmfm-test") for _ in range(3)]

    def load_on_meta() -> None:
        start.wait()
        results["loaded"] = [mmfm.load(directory) for _ in range(3)]  # each builds on the meta device
        with parameters_on_meta():
            results["meta"] = mmfm.create_model("mmfm-test")

    threads = [threading.Thread(target=build_normally), threading.Thread(target=load_on_meta)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(not p.is_meta for model in results["built"] for p in model.parameters())
    assert all(p.is_meta for p in results["meta"].parameters())
    assert all(not p.is_meta for model in results["loaded"] for p in model.parameters())


def test_checkpoint_tensors_are_aligned_and_read_by_safetensors(saved):
    from safetensors import safe_open

    from mmfm.checkpoint import TENSOR_ALIGNMENT

    model, directory = saved
    with safe_open(directory / WEIGHTS_NAME, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert keys == set(unique_state_dict(model))
    loaded = mmfm.load(directory)
    matrices = [p for p in loaded.parameters() if p.dim() >= 2]  # what matmul and conv kernels read
    aligned = [p for p in matrices if p.numel() * p.element_size() % TENSOR_ALIGNMENT == 0]
    assert len(aligned) >= len(matrices) - 2  # mmfm-test's 3-channel UNet convs are 864 bytes
    assert all(p.data_ptr() % TENSOR_ALIGNMENT == 0 for p in aligned)


def test_load_converts_dtype_once_and_moves_to_the_device(saved):
    model, directory = saved
    loaded = mmfm.load(directory, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.heads["caption"].lm_head.weight is loaded.token_embedding.weight
    torch.testing.assert_close(loaded.backbone.norm.weight, model.backbone.norm.weight.bfloat16())
    assert loaded.embed(text=["a red square"]).dtype == torch.bfloat16
    with pytest.raises(InputError, match="unknown dtype 'float8'"):
        mmfm.load(directory, dtype="float8")


def test_updating_a_loaded_model_never_writes_to_its_checkpoint(saved):
    model, directory = saved
    before = (directory / WEIGHTS_NAME).read_bytes()
    loaded = mmfm.load(directory)
    with torch.no_grad():
        for p in loaded.parameters():
            p.add_(1.0)  # what an optimizer step does, in place
    assert (directory / WEIGHTS_NAME).read_bytes() == before
    torch.testing.assert_close(loaded.backbone.norm.weight, model.backbone.norm.weight + 1)
    _same_weights(model, mmfm.load(directory))


def test_weights_in_another_dtype_are_cast_to_the_model_dtype(saved, tmp_path):
    model, directory = saved
    state = {k: v.half() for k, v in read_state_dict(directory / WEIGHTS_NAME).items()}
    loaded = build_from_weights(model.config, state, "half")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    torch.testing.assert_close(loaded.backbone.norm.weight, model.backbone.norm.weight.half().float())


# ---- a single weights file ----


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.pt"])
def test_a_weights_file_with_config_beside_it_loads_bit_exactly(saved, tmp_path, name):
    model, directory = saved
    shutil.copy(directory / "config.yaml", tmp_path / "config.yaml")
    state = read_state_dict(directory / WEIGHTS_NAME)
    if name.endswith(".pt"):
        torch.save({k: v.clone() for k, v in state.items()}, tmp_path / name)
    else:
        shutil.copy(directory / WEIGHTS_NAME, tmp_path / name)
    _same_weights(model, mmfm.load(tmp_path / name))


def test_a_weights_file_without_config_says_how_to_convert(saved, tmp_path):
    shutil.copy(saved[1] / WEIGHTS_NAME, tmp_path / "lonely.safetensors")
    with pytest.raises(CheckpointError, match=r"lonely.safetensors: no config.yaml beside .*`mmfm convert"):
        mmfm.load(tmp_path / "lonely.safetensors")


def test_weights_of_another_architecture_list_every_problem_together(saved, tmp_path):
    shutil.copy(saved[1] / "config.yaml", tmp_path / "config.yaml")
    other = mmfm.create_model("mmfm-test", backbone={"depth": 3, "dim": 96, "num_heads": 4}, classify=None)
    save_file(
        {k: v.contiguous() for k, v in other.state_dict().items() if "lm_head" not in k}, tmp_path / "o.safetensors"
    )
    with pytest.raises(CheckpointError) as e:
        mmfm.load(tmp_path / "o.safetensors")
    message = str(e.value)
    assert "o.safetensors: the weights do not fit this model" in message
    assert "mis-shaped keys" in message and "missing keys (2): heads.classify" in message
    assert "unexpected keys" in message and "backbone.blocks.2." in message


def test_an_unknown_name_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"no such checkpoint directory or file, nor a pretrained tag"):
        mmfm.load(tmp_path / "absent" / "deeper")


# ---- never unpickled ----


def test_a_pickle_is_never_unpickled_by_load_or_convert(saved, tmp_path, ast_dir, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(saved[1] / "config.yaml", evil / "config.yaml")
    torch.save({"weight": Exploit(marker)}, evil / "weights.pt")  # beside a config.yaml: mmfm.load reads it
    with pytest.raises(CheckpointError, match=r"weights.pt: refusing to unpickle"):
        mmfm.load(evil / "weights.pt")

    hf = tmp_path / "hf_evil"  # an AST directory whose pytorch_model.bin is the exploit
    hf.mkdir()
    shutil.copy(ast_dir / "config.json", hf / "config.json")
    (hf / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": Exploit(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: refusing to unpickle"):
        mmfm.load(hf, base="mmfm-test")
    assert cli(["convert", str(hf), str(tmp_path / "out"), "--from", "ast", "--base", "mmfm-test"]) == 2
    assert "pytorch_model.bin: refusing to unpickle" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---- converted weights: strict and non-strict ----


def test_converted_weights_strictness(ast_dir):
    from mmfm.convert import convert

    converted = convert("ast", ast_dir)
    extra = Converted(converted.config, {**converted.state_dict, "encoders.audio.vit.extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): encoders.audio.vit.extra"):
        from_converted(extra, "mmfm-test", "extra")
    model, fresh = from_converted(extra, "mmfm-test", "extra", strict=False)
    assert "backbone" in fresh and "encoders.audio" not in fresh

    short = dict(converted.state_dict)
    short.pop("encoders.audio.vit.norm.weight")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): encoders.audio.vit.norm.weight"):
        from_converted(Converted(converted.config, short), "mmfm-test", "short")
    model, _ = from_converted(Converted(converted.config, short), "mmfm-test", "short", strict=False)
    assert torch.equal(model.encoders["audio"].vit.norm.bias, converted.state_dict["encoders.audio.vit.norm.bias"])


# ---- pretrained tags ----


def test_the_table_lists_tags_with_their_provenance():
    tags = mmfm.list_pretrained()
    assert {"ast-audioset", "clip-vit-b-32-laion2b", "all-minilm-l6-v2"} <= set(tags) and tags == sorted(tags)
    for name in tags:
        entry = get_pretrained(name)
        assert entry.license and entry.preprocessing and (entry.hub_id or entry.path)
        assert entry.sha256 is None or len(entry.sha256) == 64
    with pytest.raises(CheckpointError, match=r"unknown pretrained tag 'nope' \(known: all-minilm-l6-v2"):
        get_pretrained("nope")


def test_a_tag_is_checked_against_its_sha256_before_use(saved, tag):
    model, directory = saved
    digest = hashlib.sha256((directory / WEIGHTS_NAME).read_bytes()).hexdigest()
    tag(tag="test-good", source="mmfm", path=str(directory), filename=WEIGHTS_NAME, sha256=digest)
    _same_weights(model, mmfm.load("test-good"))

    wrong = "0" * 64
    tag(tag="test-bad", source="mmfm", path=str(directory), filename=WEIGHTS_NAME, sha256=wrong)
    with pytest.raises(CheckpointError) as e:
        mmfm.load("test-bad")
    assert f"{directory / WEIGHTS_NAME}: sha256 mismatch: expected {wrong}, got {digest}" in str(e.value)


def test_a_tag_of_one_tower_builds_its_base_around_it(ast_dir, tag):
    tag(tag="test-ast", source="ast", path=str(ast_dir), base="mmfm-test", license="test", preprocessing="AST")
    with pytest.warns(UserWarning, match=r"the ast weights leave backbone, .* freshly initialised \(from mmfm-test\)"):
        model = mmfm.load("test-ast")
    assert (
        model.config.audio.reg_tokens == 1 and model.config.backbone == mmfm.create_model("mmfm-test").config.backbone
    )


# ---- hub ids ----


def test_hub_ids_come_from_the_cache_offline_and_fail_clearly_otherwise(saved, tmp_path, monkeypatch):
    from huggingface_hub import constants

    model, directory = saved
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--mmfm-org--tiny"  # the hub cache layout snapshot_download reads
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(directory, repo / "snapshots" / commit)
    # what HF_HUB_OFFLINE=1 and HF_HUB_CACHE set when huggingface_hub is imported
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    _same_weights(model, mmfm.load("hf-hub:mmfm-org/tiny"))
    with pytest.raises(CheckpointError) as e:
        mmfm.load("hf-hub:mmfm-org/absent")
    message = str(e.value)
    assert message.startswith("mmfm-org/absent: could not fetch this Hugging Face hub id (HF_HUB_OFFLINE is set")
    assert "pass their directory" in message and "mmfm.load('path/to/dir')" in message


@pytest.mark.parametrize("spec", ["mmfm-org/tiny", "runs/final", "./runs/final"])
def test_only_the_hf_hub_prefix_reaches_the_hub(spec, monkeypatch):
    import mmfm.loader

    asked = []
    monkeypatch.setattr(mmfm.loader, "download_hub", lambda repo_id, **kwargs: asked.append(repo_id) or Path("/absent"))
    with pytest.raises(CheckpointError, match=rf"{re.escape(spec)}: no such checkpoint directory.*'hf-hub:org/name'"):
        mmfm.load(spec)
    assert asked == []
    with pytest.raises(CheckpointError):
        mmfm.load(f"hf-hub:{spec}")
    assert asked == [spec]  # the same name with the prefix does go to the hub


# ---- mmfm convert ----


def test_cli_convert_writes_a_checkpoint_that_loads(ast_dir, tmp_path, capsys):
    from mmfm.convert import convert

    out = tmp_path / "out"
    assert cli(["convert", str(ast_dir), str(out), "--from", "ast", "--base", "mmfm-test"]) == 0
    err = capsys.readouterr().err
    assert f"wrote {out}" in err and "freshly initialised from mmfm-test: backbone" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", WEIGHTS_NAME]
    loaded = mmfm.load(out)
    for key, value in convert("ast", ast_dir).state_dict.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert json.loads((ast_dir / "config.json").read_text())["hidden_size"] == loaded.config.audio.width


def test_cli_convert_names_unknown_sources(ast_dir, tmp_path, capsys):
    assert cli(["convert", str(ast_dir), str(tmp_path / "o"), "--from", "nope"]) == 2
    assert "--from nope: unknown source (known: " in capsys.readouterr().err


def test_cli_convert_into_its_own_source_folder_is_refused_and_loses_nothing(ast_dir, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in ast_dir.iterdir()}
    assert cli(["convert", str(ast_dir), str(ast_dir), "--from", "ast"]) == 2
    assert "mmfm: error:" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in ast_dir.iterdir()} == before
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "readme.txt").write_text("mine")
    assert cli(["convert", str(ast_dir), str(foreign), "--from", "ast", "--base", "mmfm-test"]) == 2
    assert "overwrite" in capsys.readouterr().err and sorted(p.name for p in foreign.iterdir()) == ["readme.txt"]
    assert cli(["convert", str(ast_dir), str(foreign), "--from", "ast", "--base", "mmfm-test", "--overwrite"]) == 0
    assert (foreign / "readme.txt").read_text() == "mine" and (foreign / WEIGHTS_NAME).is_file()
