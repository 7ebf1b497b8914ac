"""mmfm's own checkpoint format: `config.yaml` + `model.safetensors` (or shards with an index), nothing pickled."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import threading
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
VOCAB_NAME = "vocab.txt"  # a "wordpiece" tokenizer's vocabulary, written beside the weights
VAE_FOLDER = "vae"  # a latent-space image_gen head's frozen AutoencoderKL, in diffusers' save_pretrained layout
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
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
    A "wordpiece" tokenizer's vocabulary is written as `vocab.txt`, and the saved config's `text.vocab` says
    `vocab.txt`; a latent-space image_gen head's frozen VAE is written into `vae/` (diffusers' layout:
    config.json + diffusion_pytorch_model.safetensors) and the saved `image_gen.vae_path` says `vae`.
    `mmfm.registry.read_config` resolves both against the directory: the checkpoint is self-contained and can be
    moved or copied. Files an earlier save wrote into `directory` that this model does not have are removed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in unique_state_dict(model).items()}
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
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
    if config.text.vocab is not None:  # the vocabulary travels with the weights; the saved config points at it
        _atomic_write(directory / VOCAB_NAME, model.tokenizer.save_vocabulary)
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, vocab=VOCAB_NAME))
        written.add(VOCAB_NAME)
    earlier_vae = _saved_vae_path(directory / CONFIG_NAME) == VAE_FOLDER  # read before config.yaml is replaced
    gen = config.image_gen
    if gen is not None and gen.space == "latent":  # the VAE travels with the weights, as vae/ in a pipeline
        _save_vae(model.heads["image_gen"].vae, directory / VAE_FOLDER)
        config = dataclasses.replace(config, image_gen=dataclasses.replace(gen, vae_path=VAE_FOLDER))
    elif earlier_vae:
        _remove_saved_vae(directory / VAE_FOLDER)
    _atomic_write(directory / CONFIG_NAME, config.save)
    left_by_earlier_saves = (*directory.glob("model*.safetensors"), directory / INDEX_NAME, directory / VOCAB_NAME)
    for stale in left_by_earlier_saves:
        if stale.exists() and stale.name not in written:
            stale.unlink()


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
    """Reads (memory-mapped) every tensor of a saved model, single-file or sharded."""
    directory = Path(directory)
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.exists():
        return _read_safetensors(single)
    if not index.exists():
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} (nor a sharded {INDEX_NAME}) in the checkpoint")
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
    state = {}
    for name in files:
        state.update(_read_safetensors(directory / name))
    return state


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

    A model whose parameters are on the meta device (as `load_pretrained` builds it) takes the checkpoint's
    tensors themselves (`load_state_dict(assign=True)`, cast to the model's dtype where they differ): nothing
    is copied, memory-mapped weights stay mapped, and tied parameters are re-tied to the loaded tensor. Such
    a model must get every parameter from `state`, since a meta parameter has no values to keep.
    """
    expected = {k: tuple(v.shape) for k, v in unique_state_dict(model).items()}
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


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: weights file is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors; truncated or corrupt? ({e})") from None


def _saved_vae_path(config_path: Path) -> str | None:
    """The `image_gen.vae_path` an earlier save wrote into `config_path`, if any."""
    try:
        data = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    gen = data.get("image_gen") if isinstance(data, dict) else None
    return gen.get("vae_path") if isinstance(gen, dict) else None


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
    os.replace(tmp, path)
