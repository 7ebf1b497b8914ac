"""mmfm's own checkpoint format: `config.yaml` + `model.safetensors` (or shards with an index), nothing pickled."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from mmfm.errors import CheckpointError

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# The file each tokenizer with a vocabulary file writes beside the weights ("wordpiece": BERT's vocab.txt, "hf": a
# Hugging Face tokenizer.json).
VOCAB_NAMES = {"wordpiece": "vocab.txt", "hf": "tokenizer.json"}
VAE_FOLDER = "vae"  # a latent-space image_gen head's frozen AutoencoderKL, in diffusers' save_pretrained layout
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# A shard index is a small JSON weight map (about 100 bytes a tensor); a larger file is not an index.
MAX_INDEX_BYTES = 64 * 1024**2
# The shard names save_pretrained writes; only files so named (and listed in its index) are ever removed by a save.
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Elements checked for NaN/inf at a time when loading: bounds the temporary memory of the check.
_FINITE_CHUNK = 1 << 22
# Every tensor whose size allows starts this many bytes into a page: memory-mapped weights are then as aligned as
# freshly allocated ones, and CPU kernels whose summation order depends on alignment give bit-identical results.
TENSOR_ALIGNMENT = 64
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def unique_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with tied tensors kept once, under the first key that holds them."""
    out, seen = {}, set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        # meta tensors have no storage to compare, so a tie there is the same Parameter object
        ident = id(tensor) if tensor.is_meta else (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        ident = (ident, tuple(tensor.shape))
        if ident not in seen:
            seen.add(ident)
            out[key] = tensor.detach()
    return out


def save_pretrained(model: nn.Module, directory: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Writes the model's config and weights into `directory`.

    Weights larger than `max_shard_bytes` are split into `model-0000i-of-0000n.safetensors` files with a
    `model.safetensors.index.json` weight map (the Hugging Face layout). Every file is written under a
    temporary name and renamed into place, so an interrupted save never leaves a half-written file behind.
    A tokenizer's vocabulary file is written beside the weights (`vocab.txt` for "wordpiece", `tokenizer.json` for
    "hf") and the saved config's `text.vocab` names it; a latent-space image_gen head's frozen VAE is written into
    `vae/` (diffusers' layout: config.json + diffusion_pytorch_model.safetensors) and the saved
    `image_gen.vae_path` says `vae`.
    `mmfm.registry.read_config` resolves both against the directory: the checkpoint is self-contained and can be
    moved or copied. Files are written with the permissions the umask gives any new file (as `config.yaml`).

    Saving again into the same directory removes the files of the earlier save that this model does not have,
    and only those: the ones its `config.yaml` and shard index record (`model.safetensors`, the index and the
    shards it lists, the vocabulary file its config named, `vae/` when its config named it). Any other file
    (`model_backup.safetensors`, a `vocab.txt` no mmfm config points at, ...) is left alone.

    Raises:
        CheckpointError: for a model with parameters on the meta device (they hold no values to save), and for
            a sharded save beside a `model.safetensors` that no earlier save wrote (it would shadow the shards).
    """
    directory = Path(directory)
    state = unique_state_dict(model)
    on_meta = [k for k, v in state.items() if v.is_meta]
    if on_meta:
        raise CheckpointError(
            f"{directory}: cannot save {len(on_meta)} tensors on the meta device, which hold no values "
            f"({_some(on_meta)}); load or initialise the model's weights first"
        )
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: cannot save a checkpoint there: it is a file, not a folder")
    earlier = _earlier_save(directory)  # read before anything is replaced
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    single = directory / WEIGHTS_NAME
    if len(shards) > 1 and os.path.lexists(single) and WEIGHTS_NAME not in earlier.files:
        raise CheckpointError(
            f"{single}: a weights file that no earlier save_pretrained wrote (no {CONFIG_NAME} of an mmfm "
            "checkpoint beside it); the shards of this save would load as this file instead: move it away or save "
            "into another folder"
        )
    names = (
        [WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards):
        _atomic_write(directory / name, lambda tmp, shard=shard: save_aligned(shard, tmp, {"format": "pt"}))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
        _atomic_write(directory / INDEX_NAME, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    config = model.config
    written = set(names) | ({INDEX_NAME} if len(shards) > 1 else set())
    vocab_name = VOCAB_NAMES.get(config.text.tokenizer)
    if vocab_name is not None:  # the vocabulary travels with the weights; the saved config points at it
        _atomic_write(directory / vocab_name, model.tokenizer.save_vocabulary)
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, vocab=vocab_name))
        written.add(vocab_name)
    gen = config.image_gen
    if gen is not None and gen.space == "latent":  # the VAE travels with the weights, as vae/ in a pipeline
        _save_vae(model.heads["image_gen"].vae, directory / VAE_FOLDER)
        config = dataclasses.replace(config, image_gen=dataclasses.replace(gen, vae_path=VAE_FOLDER))
    elif earlier.vae:
        _remove_saved_vae(directory / VAE_FOLDER)
    _atomic_write(directory / CONFIG_NAME, config.save)
    for name in sorted(earlier.files - written):
        stale = directory / name
        if stale.is_symlink() or stale.is_file():
            stale.unlink()


def is_checkpoint_folder(directory: str | Path) -> bool:
    """Whether `directory` holds an mmfm checkpoint: an mmfm `config.yaml` and `model.safetensors` or a shard index."""
    directory = Path(directory)
    has_weights = (directory / WEIGHTS_NAME).is_file() or (directory / INDEX_NAME).is_file()
    return has_weights and _earlier_config(directory / CONFIG_NAME) is not None


@dataclasses.dataclass
class _EarlierSave:
    files: set[str]  # names inside the directory
    vae: bool


def _earlier_save(directory: Path) -> _EarlierSave:
    """What an earlier `save_pretrained` into `directory` wrote, as its `config.yaml` and shard index record it.

    A folder without a readable mmfm `config.yaml` holds no earlier save: nothing in it is mmfm's to remove.
    """
    config = _earlier_config(directory / CONFIG_NAME)
    if config is None:
        return _EarlierSave(set(), False)
    files = {WEIGHTS_NAME}
    text, gen = config.get("text"), config.get("image_gen")
    if isinstance(text, dict) and text.get("vocab") in VOCAB_NAMES.values():
        files.add(text["vocab"])
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            shards = read_shard_index(index)
        except CheckpointError:
            shards = []  # not an index mmfm wrote: its shards are not mmfm's to remove
        else:
            files.add(INDEX_NAME)
        files |= {name for name in shards if SHARD_PATTERN.fullmatch(name)}
    return _EarlierSave(files, isinstance(gen, dict) and gen.get("vae_path") == VAE_FOLDER)


def _earlier_config(path: Path) -> dict | None:
    """The mapping an earlier save's `config.yaml` holds, or None when there is none (or it is not one)."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_INDEX_BYTES:
            return None
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError, RecursionError):
        return None
    return data if isinstance(data, dict) and "backbone" in data else None


def save_aligned(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Writes a safetensors file whose tensors start `TENSOR_ALIGNMENT`-aligned wherever their sizes allow.

    safetensors' own writer packs tensors by dtype and name, so a 40-byte bias leaves every tensor after it
    unaligned. Here the header is padded (with spaces, as the format allows) to a multiple of the alignment,
    and tensors whose byte size is a multiple of it come first, so all of those are aligned when mapped; the
    few others follow. Any safetensors reader reads the file.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    order = sorted(tensors, key=lambda k: (sizes[k] % TENSOR_ALIGNMENT != 0, k))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in order:
        tensor = tensors[key]
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{key}: cannot save a {tensor.dtype} tensor as safetensors")
        dtype, shape = _SAFETENSORS_DTYPES[tensor.dtype], list(tensor.shape)
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + sizes[key]]}
        offset += sizes[key]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % TENSOR_ALIGNMENT)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for key in order:
            f.write(tensors[key].reshape(-1).view(torch.uint8).numpy())


def read_weights(directory: str | Path) -> dict[str, Tensor]:
    """Reads (memory-mapped) every tensor of a saved model, single-file or sharded.

    Only regular files inside `directory` are read: a shard index naming a file outside it (`../x`, an absolute
    path), a folder, a device or a pipe is refused before anything is opened.
    """
    directory = Path(directory)
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if os.path.lexists(single):
        return _read_safetensors(checkpoint_file(directory, WEIGHTS_NAME, "weights file"))
    if not os.path.lexists(index):
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} (nor a sharded {INDEX_NAME}) in the checkpoint")
    state = {}
    for name in read_shard_index(index):
        state.update(_read_safetensors(directory / name))
    return state


def checkpoint_file(directory: str | Path, name: object, what: str) -> Path:
    """`directory / name`, where `name` (as an index or a config wrote it) names a regular file inside `directory`.

    `name` must be a relative path that stays inside the folder (no `..`, not absolute) and lead to a regular
    file: never a folder, a device such as /dev/zero, or a pipe, which would be read without end or block.
    Symbolic links inside the folder are followed (a Hugging Face cache snapshot is made of them).

    Args:
        directory: the checkpoint folder.
        name: the file's name or relative path.
        what: what the file is, for the message ("shard", "text.vocab", ...).

    Raises:
        CheckpointError: naming the folder, `what` and `name`, and what is wrong with it.
    """
    directory = Path(directory)
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{directory}: {what} {name!r} is not a file name")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts:
        raise CheckpointError(
            f"{directory}: {what} {name!r} lies outside the checkpoint folder; a checkpoint reads only files "
            "inside its own folder (copy the file in and name it relative to the folder)"
        )
    path = directory / name
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} is missing from the checkpoint") from None
    except OSError as e:
        raise CheckpointError(f"{path}: {what} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a device, pipe or socket"
        raise CheckpointError(f"{path}: {what} is {kind}, not a regular file")
    return path


def read_shard_index(index: str | Path) -> list[str]:
    """The shard files a `model.safetensors.index.json` maps tensors to, sorted, each checked by `checkpoint_file`.

    Raises:
        CheckpointError: naming the index, when it is not a regular file, is larger than `MAX_INDEX_BYTES`, is
            not UTF-8 JSON, has no `weight_map` object mapping tensor names to file names, or names a file
            outside its folder or that is not a regular file.
    """
    index = checkpoint_file(Path(index).parent, Path(index).name, "shard index")
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise CheckpointError(
            f"{index}: a shard index of {index.stat().st_size} bytes; an index is a small JSON weight map "
            f"(at most {MAX_INDEX_BYTES} bytes)"
        )
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{index}: not a valid shard index (not UTF-8 text: a binary file?)") from None
    except (json.JSONDecodeError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise CheckpointError(f"{index}: not a valid shard index (not JSON: {reason})") from None
    except OSError as e:
        raise CheckpointError(f"{index}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict) or "weight_map" not in data:
        found = "an object without it" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise CheckpointError(
            f"{index}: not a valid shard index (expected an object with a 'weight_map', found {found})"
        )
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        found = "an empty object" if isinstance(weight_map, dict) else f"a JSON {type(weight_map).__name__}"
        raise CheckpointError(
            f"{index}: not a valid shard index ('weight_map' must map tensor names to shard file names, found {found})"
        )
    not_names = [v for v in weight_map.values() if not isinstance(v, str)]
    if not_names:
        raise CheckpointError(
            f"{index}: not a valid shard index (a 'weight_map' file name is {not_names[0]!r}, not a string)"
        )
    names = sorted(set(weight_map.values()))
    for name in names:
        checkpoint_file(index.parent, name, f"shard named in {index.name}")
    return names


def load_weights(
    model: nn.Module,
    state: dict[str, Tensor],
    source: str,
    strict: bool = True,
    required: tuple[str, ...] | None = None,
) -> list[str]:
    """Copies `state` into `model`, checking every key first.

    Missing, unexpected and mis-shaped keys are reported together in one `CheckpointError`. With
    `strict=False`, missing and unexpected keys are allowed (mis-shaped ones never are) and returned
    as warnings. `required` narrows what strict mode calls missing to keys under these prefixes
    (e.g. `("encoders.audio.",)` for weights of one tower); other missing keys are returned as warnings.

    Parameters holding NaN or infinity (a diverged run's weights, or values beyond a smaller dtype's range) are
    refused in strict mode, naming them; with `strict=False` they load with a `RuntimeWarning` naming them.
    Buffers are not checked (attention masks may hold -inf on purpose). Tensors on the meta device hold no
    values and are always refused.

    A model whose parameters are on the meta device (as `load_pretrained` builds it) takes the checkpoint's
    tensors themselves (`load_state_dict(assign=True)`, cast to the model's dtype where they differ): nothing
    is copied, memory-mapped weights stay mapped, and tied parameters are re-tied to the loaded tensor. Such
    a model must get every parameter from `state`, since a meta parameter has no values to keep.
    """
    expected = {k: tuple(v.shape) for k, v in unique_state_dict(model).items()}
    on_meta = sorted(k for k, v in state.items() if isinstance(v, Tensor) and v.is_meta)
    if on_meta:
        raise CheckpointError(
            f"{source}: {len(on_meta)} tensors are on the meta device and hold no values ({_some(on_meta)}); "
            "weights to load must be real tensors (a state dict of a model built on the meta device has none)"
        )
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise CheckpointError(f"{source}: entries that are not tensors ({len(not_tensors)}): {_some(not_tensors)}")
    missing = sorted(set(expected) - set(state))
    must_have = [k for k in missing if required is None or k.startswith(required)]
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    problems = []
    if misshaped:
        problems.append(f"mis-shaped keys ({len(misshaped)}): " + "; ".join(misshaped))
    if strict and must_have:
        problems.append(f"missing keys ({len(must_have)}): " + ", ".join(must_have))
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    if problems:
        raise CheckpointError(
            f"{source}: the weights do not fit this model (a checkpoint of another architecture or config?)\n  "
            + "\n  ".join(problems)
        )
    state = {k: v for k, v in state.items() if k in expected}
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    non_finite = sorted(k for k, v in state.items() if k in parameters and not _all_finite(v))
    if non_finite:
        what = f"{source}: {len(non_finite)} weights hold NaN or infinite values ({_some(non_finite)})"
        if strict:
            raise CheckpointError(
                f"{what}; a model with them gives NaN outputs (a diverged training run, or values beyond the range "
                "of the dtype they were converted to?). Load with strict=False to load them anyway, with a warning"
            )
        warnings.warn(f"{what}; outputs that depend on them will be NaN", RuntimeWarning, stacklevel=2)
    if any(p.is_meta for p in model.parameters()):
        _assign(model, state, source)
    else:
        with torch.no_grad():
            model.load_state_dict(state, strict=False)
    return [f"missing: {k}" for k in missing] + [f"unexpected: {k}" for k in unexpected]


_meta_construction = threading.local()


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within the block, modules built *by this thread* get every parameter on the meta device; buffers stay real.

    Parameters cost nothing to allocate or initialise there, while buffers computed in `__init__` (RoPE
    tables, non-persistent ones that no checkpoint holds) keep their values. It works through torch's
    parameter-registration hook, which asks a thread-local flag, so modules built at the same time in other
    threads are untouched.
    """
    depth = getattr(_meta_construction, "depth", 0)
    _meta_construction.depth = depth + 1
    handle = register_module_parameter_registration_hook(_parameter_on_meta)
    try:
        yield
    finally:
        handle.remove()
        _meta_construction.depth = depth


def _parameter_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    if not getattr(_meta_construction, "depth", 0) or param is None or param.is_meta:
        return None  # another thread's module, or an already meta Parameter (a tie re-registers one): keep it
    return type(param)(param.to("meta"), requires_grad=param.requires_grad)


def _assign(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Loads `state` into a meta-parameter model by taking its tensors, then re-ties every tied parameter."""
    current = model.state_dict(keep_vars=True)
    state = {k: v if v.dtype == current[k].dtype else v.to(current[k].dtype) for k, v in state.items()}
    owners: dict[int, list[str]] = {}  # id(parameter) -> every name it is registered under, first name first
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    model.load_state_dict(state, strict=False, assign=True)
    for first, *others in (names for names in owners.values() if len(names) > 1):
        loaded = next((model.get_parameter(n) for n in (first, *others) if n in state), None)
        for name in (first, *others):
            if loaded is not None and name not in state:
                module, _, leaf = name.rpartition(".")
                model.get_submodule(module)._parameters[leaf] = loaded
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(
            f"{source}: no weights for {len(left)} parameters of a model built on the meta device "
            f"({', '.join(left[:10])}{' ...' if len(left) > 10 else ''}); build it on a real device to keep "
            "their initial values"
        )


def _all_finite(tensor: Tensor) -> bool:
    """Whether every value is finite; checked in chunks, so the check's memory stays small for any tensor.

    A chunk whose sum is finite holds no NaN or infinity (either would make the sum NaN or infinite), and a sum
    reads the weights many times faster than an element-wise test; only a chunk whose sum is not finite (a
    non-finite value, or finite ones large enough to overflow) is tested value by value.
    """
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    flat = tensor.detach().reshape(-1)
    wide = torch.float64 if tensor.dtype == torch.float64 else None if tensor.is_complex() else torch.float32
    for i in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[i : i + _FINITE_CHUNK]
        if not bool(torch.isfinite(chunk.sum(dtype=wide)).all()) and not bool(torch.isfinite(chunk).all()):
            return False
    return True


def _some(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    checkpoint_file(path.parent, path.name, "weights file")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors; truncated or corrupt? ({e})") from None


def _save_vae(vae: nn.Module, folder: Path) -> None:
    """Writes the VAE with diffusers' `save_pretrained` beside `folder`, then moves each file into place.

    Re-saving a model into the folder it was loaded from overwrites the files its VAE was read from; each file
    is replaced whole, so the folder never holds a half-written one.
    """
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    vae.save_pretrained(staging, safe_serialization=True)
    folder.mkdir(exist_ok=True)
    for file in staging.iterdir():
        os.chmod(file, _new_file_mode())  # safetensors writes 0600; the checkpoint is readable as its config is
        os.replace(file, folder / file.name)
    staging.rmdir()


def _remove_saved_vae(folder: Path) -> None:
    """Removes the files `_save_vae` writes (and the folder, if nothing else is in it)."""
    for file in (folder / "config.json", *folder.glob("diffusion_pytorch_model*.safetensors*")):
        file.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.chmod(tmp, _new_file_mode())
    os.replace(tmp, path)


_umask_lock = threading.Lock()


def _new_file_mode() -> int:
    """The permissions a new file gets from `open()` under the process's umask (0644 under the usual 022)."""
    umask = None
    try:
        with open("/proc/self/status") as f:
            umask = next((int(line.split()[1], 8) for line in f if line.startswith("Umask:")), None)
    except (OSError, ValueError, IndexError):
        pass
    if umask is None:  # no /proc: read the umask by setting it, and set it back at once
        with _umask_lock:
            umask = os.umask(0o022)
            os.umask(umask)
    return 0o666 & ~umask
