"""Hostile and careless checkpoints: only regular files inside the folder are read, saves remove only their own
files, NaN weights and meta tensors are caught, and `mmfm convert` never writes over its input."""

import json
import os
import shutil
import stat
import subprocess
import time
import warnings

import pytest
import torch
import yaml
from safetensors.torch import save_file

import mmfm
from mmfm.checkpoint import INDEX_NAME, WEIGHTS_NAME, load_weights, save_pretrained
from mmfm.convert.io import read_hf_state_dict, read_state_dict
from mmfm.errors import CheckpointError, MMFMError
from mmfm.loader import build_from_weights, check_convert_output, open_model

VOCAB = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nb\n"


@pytest.fixture(scope="module")
def sharded(saved, tmp_path_factory):
    """A sharded copy of the `saved` checkpoint: config.yaml, index and shards."""
    directory = tmp_path_factory.mktemp("sharded")
    save_pretrained(saved[0], directory, max_shard_bytes=256 * 1024)
    assert len(list(directory.glob("model-*.safetensors"))) > 2
    return directory


def _copy(directory, tmp_path, name="ckpt"):
    target = tmp_path / name
    shutil.copytree(directory, target)
    return target


def _edit_index(directory, edit):
    index = directory / INDEX_NAME
    data = json.loads(index.read_text())
    edit(data)
    index.write_text(json.dumps(data))


def _load_with_fifo(fifo, *args, bound=10.0):
    """mmfm.load(*args) where `fifo` is a FIFO: (seconds taken, the error raised).

    A reader that opens the FIFO blocks until a writer does (the GIL held, in safetensors): a helper process opens
    it for writing after `bound` seconds, so a regression ends as a slow failure, never a hung suite.
    """
    release = subprocess.Popen(["sh", "-c", 'sleep "$1"; : > "$2"', "sh", str(bound), str(fifo)])
    start = time.perf_counter()
    try:
        mmfm.load(*args)
    except Exception as e:  # noqa: BLE001 - reported to the test
        return time.perf_counter() - start, e
    finally:
        release.kill()
        release.wait()
    return time.perf_counter() - start, None


# ---- shard index: only regular files inside the checkpoint folder ----


@pytest.mark.parametrize("outside", ["relative", "absolute"])
def test_a_shard_index_naming_a_file_outside_the_folder_is_refused(sharded, tmp_path, outside):
    directory = _copy(sharded, tmp_path)
    shard = sorted(directory.glob("model-*.safetensors"))[0]
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    moved = shutil.move(shard, elsewhere / shard.name)  # a valid shard, but outside the checkpoint
    name = f"../other/{shard.name}" if outside == "relative" else str(moved)
    _edit_index(
        directory, lambda d: d["weight_map"].update({k: name for k, v in d["weight_map"].items() if v == shard.name})
    )
    with pytest.raises(CheckpointError, match="lies outside the checkpoint folder") as e:
        mmfm.load(directory)
    assert INDEX_NAME in str(e.value) and name in str(e.value)
    (directory / "config.json").write_text("{}")  # the Hugging Face reader follows the same rule
    with pytest.raises(CheckpointError, match="lies outside the checkpoint folder"):
        read_hf_state_dict(directory)


def test_a_shard_that_is_a_fifo_is_refused_without_blocking(sharded, tmp_path):
    directory = _copy(sharded, tmp_path)
    shard = sorted(directory.glob("model-*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    seconds, error = _load_with_fifo(shard, directory)
    assert seconds < 5, "loading blocked on a FIFO named in the shard index"
    assert isinstance(error, CheckpointError) and "not a regular file" in str(error) and shard.name in str(error)


def test_a_shard_that_is_a_folder_is_named(sharded, tmp_path):
    directory = _copy(sharded, tmp_path)
    shard = sorted(directory.glob("model-*.safetensors"))[0]
    shard.unlink()
    shard.mkdir()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: .* is a folder, not a regular file"):
        mmfm.load(directory)


def test_symbolic_links_inside_the_folder_are_followed(sharded, tmp_path):
    """A Hugging Face cache snapshot is a folder of links to blobs elsewhere: it loads."""
    directory = tmp_path / "snapshot"
    blobs = tmp_path / "blobs"
    directory.mkdir()
    blobs.mkdir()
    for file in sharded.iterdir():
        shutil.copy(file, blobs / file.name)
        (directory / file.name).symlink_to(blobs / file.name)
    loaded = mmfm.load(directory)
    assert not any(p.is_meta for p in loaded.parameters())


@pytest.mark.parametrize(
    "index, found",
    [
        (b"[]", "found a JSON list"),
        (b'"model.safetensors"', "found a JSON str"),
        (b'{"metadata": {}}', "found an object without it"),
        (b'{"weight_map": ["model-00001-of-00002.safetensors"]}', "found a JSON list"),
        (b'{"weight_map": "model-00001-of-00002.safetensors"}', "found a JSON str"),
        (b'{"weight_map": {}}', "found an empty object"),
        (b'{"weight_map": {"a": 1}}', "a 'weight_map' file name is 1, not a string"),
        (b'{"weight_map": {"a": null}}', "a 'weight_map' file name is None, not a string"),
        (b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary", "not UTF-8 text"),
        (b"{" * 100_000, "not JSON"),
        (b"not json", "not JSON"),
    ],
)
def test_an_index_of_the_wrong_type_is_a_checkpoint_error_naming_it(sharded, tmp_path, index, found):
    directory = _copy(sharded, tmp_path)
    (directory / INDEX_NAME).write_bytes(index)
    for read in (mmfm.load, read_hf_state_dict):
        with pytest.raises(CheckpointError, match="not a valid shard index") as e:
            read(directory)
        assert str(directory / INDEX_NAME) in str(e.value) and found in str(e.value)


def test_an_index_that_is_a_folder_is_named(sharded, tmp_path):
    directory = _copy(sharded, tmp_path)
    (directory / INDEX_NAME).unlink()
    (directory / INDEX_NAME).mkdir()
    with pytest.raises(CheckpointError, match=rf"{INDEX_NAME}: shard index is a folder, not a regular file"):
        mmfm.load(directory)


def test_weights_and_config_that_are_not_regular_files_are_named(saved, tmp_path):
    directory = _copy(saved[1], tmp_path)
    (directory / "config.yaml").unlink()
    (directory / "config.yaml").mkdir()
    with pytest.raises(CheckpointError, match=r"config.yaml: config is a folder, not a regular file"):
        mmfm.load(directory)
    directory = _copy(saved[1], tmp_path, "fifo")
    (directory / WEIGHTS_NAME).unlink()
    os.mkfifo(directory / WEIGHTS_NAME)
    seconds, error = _load_with_fifo(directory / WEIGHTS_NAME, directory)
    assert seconds < 5 and isinstance(error, CheckpointError) and "not a regular file" in str(error)


# ---- the vocabulary and the VAE a checkpoint's config names ----


@pytest.fixture(scope="module")
def wordpiece_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("wordpiece")
    (root / "vocab_source.txt").write_text(VOCAB)
    model = mmfm.create_model("mmfm-test", text={"tokenizer": "wordpiece", "vocab": str(root / "vocab_source.txt")})
    model.save_pretrained(root / "ckpt")
    return root / "ckpt"


def _set_vocab(directory, value):
    config = yaml.safe_load((directory / "config.yaml").read_text())
    config["text"]["vocab"] = value
    (directory / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("outside", ["absolute", "relative"])
def test_a_vocabulary_outside_the_checkpoint_is_refused(wordpiece_checkpoint, tmp_path, outside):
    directory = _copy(wordpiece_checkpoint, tmp_path)
    (tmp_path / "elsewhere.txt").write_text(VOCAB)  # a valid vocabulary, but not the checkpoint's
    _set_vocab(directory, str(tmp_path / "elsewhere.txt") if outside == "absolute" else "../elsewhere.txt")
    with pytest.raises(CheckpointError, match=r"text.vocab .* lies outside the checkpoint folder") as e:
        mmfm.load(directory)
    assert "elsewhere.txt" in str(e.value) and str(directory / "config.yaml") in str(e.value)


def test_a_vocabulary_that_is_a_fifo_is_refused_without_blocking(wordpiece_checkpoint, tmp_path):
    directory = _copy(wordpiece_checkpoint, tmp_path)
    (directory / "vocab.txt").unlink()
    os.mkfifo(directory / "vocab.txt")
    seconds, error = _load_with_fifo(directory / "vocab.txt", directory)
    assert seconds < 5, "loading blocked on a FIFO vocabulary"
    assert isinstance(error, CheckpointError) and "vocab.txt: text.vocab is a device, pipe or socket" in str(error)


def test_the_checkpoint_vocabulary_still_loads(wordpiece_checkpoint):
    assert mmfm.load(wordpiece_checkpoint).tokenizer.vocab_size == 7


@pytest.fixture(scope="module")
def latent_checkpoint(tmp_path_factory, tiny_vae):
    root = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    tiny_vae().save_pretrained(root / "source_vae")
    image_gen = {"space": "latent", "vae_path": str(root / "source_vae"), "image_size": 16}
    mmfm.create_model("mmfm-test", image_gen=image_gen).save_pretrained(root / "ckpt")
    return root / "ckpt"


def test_a_vae_outside_the_checkpoint_is_refused(latent_checkpoint, tmp_path):
    directory = _copy(latent_checkpoint, tmp_path)
    config = yaml.safe_load((directory / "config.yaml").read_text())
    config["image_gen"]["vae_path"] = str(latent_checkpoint.parent / "source_vae")
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match=r"image_gen.vae_path .*source_vae.* lies outside the checkpoint folder"):
        mmfm.load(directory)


def test_vae_weights_that_are_a_fifo_are_refused(latent_checkpoint, tmp_path):
    directory = _copy(latent_checkpoint, tmp_path)
    weights = directory / "vae" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    seconds, error = _load_with_fifo(weights, directory)
    assert seconds < 5 and isinstance(error, CheckpointError) and "not a regular file" in str(error)


# ---- file permissions ----


def test_checkpoint_files_are_readable_as_the_umask_allows_like_the_config(latent_checkpoint, tmp_path):
    model = mmfm.load(latent_checkpoint)
    previous = os.umask(0o027)
    try:
        model.save_pretrained(tmp_path / "out")
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.yaml", WEIGHTS_NAME, "diffusion_pytorch_model.safetensors"}
    modes = {str(p.relative_to(tmp_path / "out")): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o640"}, modes


# ---- save_pretrained removes only what its previous save wrote ----

OTHERS = [
    "model_backup.safetensors",
    "model-best.safetensors",
    "models_ensemble.safetensors",
    "model-00009-of-00009.safetensors",
]


def test_saving_again_keeps_every_file_no_earlier_save_wrote(saved, tmp_path):
    model = saved[0]
    for name in OTHERS:
        save_file({"x": torch.ones(2)}, tmp_path / name)
    (tmp_path / "vocab.txt").write_text("someone else's vocabulary\n")
    (tmp_path / "notes.txt").write_text("mine")
    model.save_pretrained(tmp_path)
    save_pretrained(model, tmp_path, max_shard_bytes=256 * 1024)  # sharded: the single file goes
    assert not (tmp_path / WEIGHTS_NAME).exists()
    model.save_pretrained(tmp_path)  # single again: the shards and the index go
    assert not (tmp_path / INDEX_NAME).exists() and not list(tmp_path.glob("model-0000[1-8]-of-*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*OTHERS, "vocab.txt", "notes.txt", "config.yaml", WEIGHTS_NAME]
    )
    assert (tmp_path / "vocab.txt").read_text() == "someone else's vocabulary\n"
    assert all(read_state_dict(tmp_path / name)["x"].tolist() == [1.0, 1.0] for name in OTHERS)


def test_a_vocabulary_mmfm_wrote_goes_when_the_next_model_has_none(wordpiece_checkpoint, saved, tmp_path):
    directory = _copy(wordpiece_checkpoint, tmp_path)
    saved[0].save_pretrained(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["config.yaml", WEIGHTS_NAME]


def test_an_earlier_index_naming_files_elsewhere_never_removes_them(sharded, saved, tmp_path):
    directory = _copy(sharded, tmp_path)
    victim = tmp_path / "model-00001-of-00001.safetensors"
    save_file({"x": torch.ones(1)}, victim)
    _edit_index(directory, lambda d: d["weight_map"].update({"extra": f"../{victim.name}", "other": str(victim)}))
    saved[0].save_pretrained(directory)
    assert victim.exists()


def test_a_sharded_save_beside_a_foreign_single_file_is_refused_before_writing(saved, tmp_path):
    save_file({"x": torch.ones(1)}, tmp_path / WEIGHTS_NAME)  # someone's weights, no mmfm config
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME}: a weights file that no earlier save_pretrained wrote"):
        save_pretrained(saved[0], tmp_path, max_shard_bytes=256 * 1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME]


def test_saving_into_a_file_is_a_checkpoint_error(saved, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"file: cannot save a checkpoint there: it is a file"):
        saved[0].save_pretrained(tmp_path / "file")


# ---- non-finite weights and meta tensors ----


@pytest.fixture(scope="module")
def nan_checkpoint(saved, tmp_path_factory):
    directory = tmp_path_factory.mktemp("nan")
    model = mmfm.create_model("mmfm-test")
    with torch.no_grad():
        model.backbone.norm.weight[3] = float("nan")
        model.heads["classify"].fc.bias[0] = float("inf")
    model.save_pretrained(directory)
    return directory


def test_non_finite_weights_are_refused_when_strict_and_warned_otherwise(nan_checkpoint):
    with pytest.raises(CheckpointError, match=r"2 weights hold NaN or infinite values") as e:
        mmfm.load(nan_checkpoint)
    assert "backbone.norm.weight" in str(e.value) and "heads.classify.fc.bias" in str(e.value)
    assert str(nan_checkpoint) in str(e.value) and "strict=False" in str(e.value)
    with pytest.warns(RuntimeWarning, match=r"backbone.norm.weight.*heads.classify.fc.bias"):
        model = mmfm.load(nan_checkpoint, strict=False)
    assert torch.isnan(model.backbone.norm.weight[3])


def test_finite_weights_load_without_a_warning(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        mmfm.load(saved[1])


def test_meta_tensors_handed_in_are_a_checkpoint_error(saved):
    model = saved[0]
    meta = {k: v.to("meta") for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"<meta state>: \d+ tensors are on the meta device and hold no values"):
        build_from_weights(model.config, meta, "<meta state>")
    fresh = mmfm.create_model("mmfm-test")
    with pytest.raises(CheckpointError, match="on the meta device"):
        load_weights(fresh, {**fresh.state_dict(), "backbone.norm.weight": torch.empty(64, device="meta")}, "<x>")
    assert not fresh.backbone.norm.weight.is_meta


def test_saving_a_model_on_the_meta_device_writes_nothing(tmp_path):
    with torch.device("meta"):
        model = mmfm.create_model("mmfm-test")
    with pytest.raises(CheckpointError, match=r"cannot save \d+ tensors on the meta device"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- refused pickles ----


class SystemCall:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_refused_pickle_never_advises_weights_only_false(tmp_path):
    torch.save({"weight": SystemCall()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to unpickle") as e:
        read_state_dict(tmp_path / "evil.pt")
    message = str(e.value)
    assert "False" not in message and "trusted source" not in message
    assert "system" in message  # what it stopped at


# ---- paths no file system takes ----


@pytest.mark.parametrize("spec", ["a" * 5000, "x/" * 3000, "runs/fin\x00al"])
def test_paths_no_file_system_takes_are_checkpoint_errors(spec):
    for call in (mmfm.load, open_model):
        with pytest.raises(MMFMError) as e:
            call(spec)
        assert len(str(e.value)) < 1000 and "\x00" not in str(e.value)


# ---- mmfm convert: never over its input, never into someone else's folder ----


def test_convert_output_that_is_the_input_or_inside_it_is_refused(saved, tmp_path):
    src = _copy(saved[1], tmp_path, "src")
    for out in (src, src / "sub", src / ".." / "src", tmp_path / "link"):
        if out.name == "link":
            out.symlink_to(src)
        with pytest.raises(CheckpointError, match="the output is the input .* or lies inside it"):
            check_convert_output(src, out, overwrite=True)
    with pytest.raises(CheckpointError, match="would replace the input"):
        check_convert_output(src / WEIGHTS_NAME, src, overwrite=True)
    with pytest.raises(CheckpointError, match="would replace the input"):
        check_convert_output(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", tmp_path, overwrite=True)


def test_convert_into_a_folder_of_other_files_needs_overwrite(saved, tmp_path):
    src = saved[1] / WEIGHTS_NAME
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(CheckpointError, match=r"photos: the output folder holds files \(cat.jpg\)") as e:
        check_convert_output(src, out)
    assert "overwrite=True" in str(e.value)
    assert check_convert_output(src, out, overwrite=True) == out
    weights_dir = tmp_path / "weights"  # the input's own folder, under another name: it is not the input
    weights_dir.mkdir()
    (weights_dir / "vit.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not an mmfm checkpoint"):
        check_convert_output(weights_dir / "vit.safetensors", weights_dir)
    assert check_convert_output(weights_dir / "vit.safetensors", weights_dir, overwrite=True) == weights_dir


def test_convert_into_a_new_an_empty_or_an_mmfm_folder_is_allowed(saved, tmp_path):
    src = saved[1] / WEIGHTS_NAME
    assert check_convert_output(src, tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    (tmp_path / "empty").mkdir()
    assert check_convert_output(src, tmp_path / "empty") == tmp_path / "empty"
    earlier = _copy(saved[1], tmp_path, "earlier")
    assert check_convert_output(src, earlier) == earlier
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="the output must be a folder"):
        check_convert_output(src, tmp_path / "file", overwrite=True)


@pytest.mark.parametrize("config", [b"[" * 100_000, b'{"model_type": ["bert"]}', b"\xff\xfe binary", b"[]"])
def test_a_folder_whose_config_json_is_not_a_hugging_face_config_is_named(tmp_path, config):
    (tmp_path / "config.json").write_bytes(config)
    with pytest.raises(CheckpointError, match=r"not a Hugging Face directory mmfm can convert"):
        mmfm.load(tmp_path)


@pytest.mark.parametrize("spec", ["a" * 5000, "x/" * 3000])
def test_converting_from_a_path_no_file_system_takes_is_a_checkpoint_error(spec):
    from mmfm.convert import convert

    with pytest.raises(CheckpointError, match="not a usable path to convert from 'ast'") as e:
        convert("ast", spec)
    assert len(str(e.value)) < 1000
