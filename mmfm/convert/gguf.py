"""GGUF files (llama.cpp's format) of Llama-family language models -> an mmfm text-only model and its tokenizer.

```python
converted = mmfm.convert.convert("gguf", "SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.bfloat16)
config, state_dict = converted          # converted.tokenizer: the tokenizer the file's metadata describes
model = mmfm.load("SmolLM2-135M-Instruct.Q4_1.gguf")

gguf = read_gguf("model.gguf")          # header and metadata checked; the weights stay memory-mapped
gguf.metadata["general.architecture"]   # "llama"
for name, tensor in gguf.tensors(torch.float32):   # one tensor dequantized at a time
    ...
```

The file is read with the `gguf` package (`GGUFReader`, memory-mapped) and checked before anything is dequantized:
the architecture ("llama", which is also what llama.cpp writes for Mistral models, and "qwen2"), every tensor's
type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; others are refused by name) and
the extent of every tensor's data against the file's size (a truncated or corrupt file is refused by name). Each
tensor is then dequantized with `gguf.quants.dequantize` (F32, F16 and BF16 tensors are copied as they are) and
cast to the requested dtype, one tensor at a time, its shape reversed into PyTorch's (out, in) order.

Key map (GGUF -> Hugging Face Llama, then `mmfm.convert.hf_llama.state_from_hf` -> mmfm): token_embd ->
model.embed_tokens, output_norm -> model.norm, output -> lm_head (absent: tied embeddings), and per block
blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down} ->
model.layers.N.{input_layernorm, self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj,
post_attention_layernorm, mlp.gate_proj, mlp.up_proj, mlp.down_proj} (weights, and qwen2's q/k/v biases).
llama.cpp stores a "llama" model's q and k rows permuted (its converter's `LlamaModel.permute`, which turns
Hugging Face's rotate-half RoPE layout into GGML's interleaved one); `unpermute` undoes it. "qwen2" is not permuted.
A `rope_freqs.weight` tensor (llama.cpp's Llama 3 RoPE factors) becomes `rope_scaling` of type "llama3".

The metadata becomes a Hugging Face config dict (`hf_config_from_gguf`) that `hf_llama.config_from_hf` turns into
mmfm's config; the tokenizer (`HFTokenizer.from_gguf`), its special tokens and the chat template come from the
`tokenizer.*` keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mmfm.convert import Converted, register_converter
from mmfm.convert.hf_llama import TEXT_ONLY, config_from_hf, state_from_hf
from mmfm.convert.keys import rename
from mmfm.encoders.hf_tokenizer import HFTokenizer
from mmfm.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

# GGUF general.architecture -> Hugging Face model_type (llama.cpp writes Mistral models as "llama").
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# Architectures whose q/k rows llama.cpp's converter permutes.
PERMUTED = ("llama",)
# GGML tensor types read (dequantized by `gguf.quants.dequantize`).
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# llama.cpp's Llama 3 RoPE factors: consumed into the config's rope_scaling, not a weight.
ROPE_FREQS = "rope_freqs.weight"
# The RoPE factors alone do not fix the context length Llama 3 scaling was defined for; any length gives the same
# frequencies with suitably scaled low/high frequency factors, and this is Llama 3's.
LLAMA3_ORIGINAL_CONTEXT = 8192

_BLOCK = "blk.{}."
_LAYER = "model.layers.{}."
KEY_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    _BLOCK + "attn_norm.weight": _LAYER + "input_layernorm.weight",
    _BLOCK + "ffn_norm.weight": _LAYER + "post_attention_layernorm.weight",
    _BLOCK + "attn_output.weight": _LAYER + "self_attn.o_proj.weight",
    **{_BLOCK + f"ffn_{p}.weight": _LAYER + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
    **{_BLOCK + f"attn_{p}.{w}": _LAYER + f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")},
}


@dataclass
class GGUFFile:
    """A checked, memory-mapped GGUF file: its metadata as Python values and its tensors, dequantized on demand.

    Attributes:
        path: the file.
        metadata: every key-value pair of the file (`gguf_metadata`).
        architecture: `general.architecture`, one of `ARCHITECTURES`.
        reader: the `gguf.GGUFReader` over the file.
    """

    path: Path
    metadata: dict[str, Any]
    architecture: str
    reader: GGUFReader

    @property
    def tensor_names(self) -> list[str]:
        """The file's tensor names, in file order."""
        return [t.name for t in self.reader.tensors]

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in PyTorch order (GGUF lists dimensions innermost first)."""
        return tuple(reversed([int(d) for d in self._tensor(name).shape]))

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """One tensor, dequantized to `dtype` (see `dequantize_tensor`)."""
        return dequantize_tensor(self._tensor(name), dtype)

    def tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) for every tensor in file order, each dequantized to `dtype` only when it is reached."""
        for t in self.reader.tensors:
            yield t.name, dequantize_tensor(t, dtype)

    def _tensor(self, name: str) -> ReaderTensor:
        found = next((t for t in self.reader.tensors if t.name == name), None)
        if found is None:
            raise CheckpointError(f"{self.path}: no tensor '{name}'")
        return found


def read_gguf(path: str | Path) -> GGUFFile:
    """Opens a GGUF file (memory-mapped) and checks it before anything is dequantized.

    Raises:
        CheckpointError: naming the file: not a GGUF file, truncated or corrupt (the header does not parse, or a
            tensor's data runs past the end of the file), big-endian, an architecture other than
            `ARCHITECTURES` (naming `general.architecture`), or tensors of types other than `TENSOR_TYPES` (all
            named with their types).
    """
    from gguf import GGUFReader

    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")

    class _BoundedReader(GGUFReader):
        """A reader whose every read must lie inside the file. GGUFReader's `_get` returns fewer items, or fails
        to view the bytes, past the end; a corrupt count could then keep it looping over empty reads."""

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise ValueError(f"the file ends at byte {len(self.data)}, but its contents run to byte {end}")
            return super()._get(offset, dtype, count, override_order)

    try:
        reader = _BoundedReader(path)
        metadata = gguf_metadata(reader)
    except (ValueError, KeyError, IndexError, OverflowError, TypeError, RecursionError) as e:
        # what GGUFReader raises on a malformed file (UnicodeDecodeError, for bad UTF-8, is a ValueError)
        reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{path}: not a readable GGUF file; truncated or corrupt? ({reason})") from None
    if reader.byte_order != "I":
        raise CheckpointError(f"{path}: a big-endian GGUF file; only little-endian files are read")
    _check_extents(reader, path)
    architecture = metadata.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: general.architecture {architecture!r} is not one this converter reads "
            f"({', '.join(ARCHITECTURES)})"
        )
    unsupported = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors if t.tensor_type.name not in TENSOR_TYPES]
    if unsupported:
        raise CheckpointError(
            f"{path}: {len(unsupported)} tensors of types this converter does not dequantize: "
            f"{', '.join(unsupported)} (it reads {', '.join(TENSOR_TYPES)})"
        )
    return GGUFFile(path, metadata, architecture, reader)


def gguf_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every key-value pair of a GGUF file as Python values (str, int, float, bool, or lists of them).

    The reader's own bookkeeping entries (`GGUF.version`, `GGUF.tensor_count`, `GGUF.kv_count`) are left out.
    """
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def dequantize_tensor(tensor: ReaderTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A GGUF tensor as a new PyTorch tensor of `dtype`, in PyTorch's dimension order.

    F32 and F16 tensors are copied as they are and BF16 ones reinterpreted, then cast; quantized ones are
    dequantized by `gguf.quants.dequantize` (to float32) and cast. The result equals `gguf.quants.dequantize`'s,
    cast to `dtype`.
    """
    from gguf.quants import dequantize

    kind = tensor.tensor_type.name
    if kind in ("F32", "F16"):
        out = torch.from_numpy(np.array(tensor.data))
    elif kind == "BF16":
        out = torch.from_numpy(np.array(tensor.data)).view(torch.bfloat16)
    else:
        out = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type))
    return out.reshape(tuple(reversed([int(d) for d in tensor.shape]))).to(dtype)


def unpermute(weight: Tensor, num_heads: int) -> Tensor:
    """Undoes llama.cpp's q/k row permutation (`LlamaModel.permute` in convert_hf_to_gguf.py).

    Within each head, llama.cpp interleaves the first and second half of the rows (row `i` and `i + half` become
    rows `2i` and `2i + 1`); this puts them back, for a weight (rows, in) or a bias (rows,).
    """
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def hf_config_from_gguf(gguf: GGUFFile) -> dict[str, Any]:
    """The Hugging Face config (`config.json` fields) a GGUF file's metadata describes.

    Raises:
        CheckpointError: a required metadata key is missing or of the wrong type (named).
        ConfigError: listing every setting of the file that no Hugging Face Llama/Qwen2 config expresses.
    """
    meta, arch, source = gguf.metadata, gguf.architecture, gguf.path

    def number(key: str, kind: type, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{source}: metadata {arch}.{key} is missing")
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise CheckpointError(f"{source}: metadata {arch}.{key} is {value!r}, expected a single {kind.__name__}")
        return kind(value)

    heads = number("attention.head_count", int)
    hidden = number("embedding_length", int)
    head_dim = number("attention.key_length", int, hidden // max(heads, 1))
    names = set(gguf.tensor_names)
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{source}: no token_embd.weight tensor (the token embedding)")
    hf: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": number("feed_forward_length", int),
        "num_hidden_layers": number("block_count", int),
        "num_attention_heads": heads,
        "num_key_value_heads": number("attention.head_count_kv", int, heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": number("attention.layer_norm_rms_epsilon", float),
        "rope_theta": number("rope.freq_base", float, 10000.0),
        "max_position_embeddings": number("context_length", int),
        "vocab_size": gguf.shape("token_embd.weight")[0],
        "tie_word_embeddings": "output.weight" not in names,
    }
    if arch == "llama":
        hf["attention_bias"] = "blk.0.attn_q.bias" in names
    for kind, hf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        if isinstance(meta.get(f"tokenizer.ggml.{kind}_token_id"), int):
            hf[hf_key] = meta[f"tokenizer.ggml.{kind}_token_id"]

    problems = []
    if number("expert_count", int, 0):
        problems.append(f"{arch}.expert_count={meta[f'{arch}.expert_count']} (a mixture of experts)")
    if number("attention.value_length", int, head_dim) != head_dim:
        problems.append(f"{arch}.attention.value_length={meta[f'{arch}.attention.value_length']} != key_length")
    if number("rope.dimension_count", int, head_dim) != head_dim:
        problems.append(f"{arch}.rope.dimension_count={meta[f'{arch}.rope.dimension_count']} (partial RoPE)")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        hf["rope_scaling"] = {"rope_type": scaling, "factor": number("rope.scaling.factor", float, 1.0)}
        if f"{arch}.rope.scaling.original_context_length" in meta:
            original = number("rope.scaling.original_context_length", int)
            hf["rope_scaling"]["original_max_position_embeddings"] = original
    if ROPE_FREQS in names:
        if "rope_scaling" in hf:
            problems.append(f"both {arch}.rope.scaling.type={scaling!r} and a {ROPE_FREQS} tensor")
        else:
            factors = gguf.tensor(ROPE_FREQS, torch.float64)
            hf["rope_scaling"] = _llama3_rope_scaling(factors, hf["rope_theta"], head_dim, source)
    if problems:
        raise ConfigError(f"{source}: settings mmfm does not model: {'; '.join(problems)}")
    return hf


def hf_state_from_gguf(gguf: GGUFFile, hf: dict[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The file's weights under Hugging Face names, q/k un-permuted for "llama", each tensor dequantized to `dtype`.

    Tensor names are all checked before the first is dequantized.

    Args:
        gguf: the file.
        hf: its Hugging Face config (`hf_config_from_gguf`), for the head counts.
        dtype: the weights' dtype.

    Raises:
        CheckpointError: listing every tensor name the key map does not know.
    """
    hf_names = {gguf_name: hf_name for hf_name, gguf_name in _names(gguf).items()}
    heads = {"attn_q": hf["num_attention_heads"], "attn_k": hf["num_key_value_heads"]}
    state = {}
    for name, tensor in gguf.tensors(dtype):
        if name == ROPE_FREQS:
            continue
        kind = name.split(".")[2] if name.startswith("blk.") else None  # blk.N.attn_q.weight -> attn_q
        if gguf.architecture in PERMUTED and kind in heads:
            if tensor.shape[0] % (2 * heads[kind]):
                raise CheckpointError(
                    f"{gguf.path}: {name} has {tensor.shape[0]} rows, not an even number per head for "
                    f"{heads[kind]} heads"
                )
            tensor = unpermute(tensor, heads[kind])
        state[hf_names[name]] = tensor
    return state


@register_converter("gguf")
def convert_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> Converted:
    """Reads a GGUF file of a Llama-family LM as a text-only mmfm model, with its tokenizer and chat template.

    Everything is checked (file, architecture, tensor types, config, tokenizer, tensor names) before the weights
    are dequantized, one tensor at a time, straight to `dtype`.

    Args:
        path: the .gguf file.
        dtype: the weights' dtype (torch.float32, torch.bfloat16, torch.float16).

    Returns:
        `hf_llama.config_from_hf`'s config with a "text" section for the file's tokenizer ("hf", its special
        tokens and chat template), the mmfm weights, and the tokenizer itself as `Converted.tokenizer`.

    Raises:
        CheckpointError: the file is not a readable GGUF file of a supported architecture and tensor types, or its
            tensors do not fit its metadata (all named).
        ConfigError: settings mmfm does not model, or `dtype` is not a floating-point dtype.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating-point torch.dtype (torch.float32, ...), got {dtype!r}")
    gguf = read_gguf(path)
    source = str(gguf.path)
    hf = hf_config_from_gguf(gguf)
    config = config_from_hf(hf, source)
    try:
        tokenizer = HFTokenizer.from_gguf(gguf.metadata)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
    text = _text_config(gguf, tokenizer)
    state = state_from_hf(hf_state_from_gguf(gguf, hf, dtype), hf, source)
    config["text"].update(text)
    config["name"] = gguf.path.stem  # the file's own name ("SmolLM2-135M-Instruct.Q4_1"), as a folder's is
    return Converted(config, state, tokenizer=tokenizer, base=TEXT_ONLY)


def _names(gguf: GGUFFile) -> dict[str, str]:
    """Hugging Face name -> GGUF name of every weight; CheckpointError listing the names the key map lacks."""
    names = [n for n in gguf.tensor_names if n != ROPE_FREQS]
    return rename(dict(zip(names, names)), KEY_MAP, str(gguf.path))


def _check_extents(reader: GGUFReader, path: Path) -> None:
    """Every tensor's data, padded to the file's alignment as llama.cpp writes and reads it, lies inside the file."""
    size = len(reader.data)
    for t in reader.tensors:
        end = t.data_offset + -(-t.n_bytes // reader.alignment) * reader.alignment
        if end > size:
            raise CheckpointError(
                f"{path}: truncated or corrupt GGUF file: tensor {t.name}'s data ends at byte {end}, "
                f"the file has {size} bytes"
            )


def _text_config(gguf: GGUFFile, tokenizer: HFTokenizer) -> dict[str, Any]:
    """TextConfig fields of the file's tokenizer: its special tokens (as the tokenizer read them) and chat template."""
    template = gguf.metadata.get("tokenizer.chat_template")
    return {
        "tokenizer": "hf",
        "vocab": None,
        "chat_template": template if isinstance(template, str) else None,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "stop_tokens": list(tokenizer.stop_tokens),
    }


def _llama3_rope_scaling(factors: Tensor, theta: float, head_dim: int, source: Path) -> dict[str, Any]:
    """Llama 3 `rope_scaling` parameters that reproduce llama.cpp's per-frequency RoPE factors.

    llama.cpp stores, per frequency, 1 (short wavelengths), `factor` (long ones) or a smooth blend between them whose
    blend weight is linear in the inverse wavelength; two blended frequencies give the low and high frequency factors
    for `LLAMA3_ORIGINAL_CONTEXT`. With fewer, Llama 3's own 1 and 4 are tried. Either way the parameters must
    reproduce every stored factor.

    Raises:
        CheckpointError: not one factor per frequency.
        ConfigError: no Llama 3 scaling gives these factors.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if factors.shape != inv_freq.shape:
        raise CheckpointError(f"{source}: {ROPE_FREQS} has shape {tuple(factors.shape)}, expected ({head_dim // 2},)")
    factor = float(factors.max())
    blend = (1 / factors - 1 / factor) / (1 - 1 / factor) if factor > 1 else factors * 0
    blended = ((blend > 1e-6) & (blend < 1 - 1e-6)).nonzero().flatten().tolist()
    candidates = [(1.0, 4.0)]
    if len(blended) >= 2:  # blend = (x - low) / (high - low), x = context / wavelength
        x = LLAMA3_ORIGINAL_CONTEXT * inv_freq / (2 * math.pi)
        i, j = blended[0], blended[-1]
        slope = float((blend[j] - blend[i]) / (x[j] - x[i]))
        low = float(x[i] - blend[i] / slope)
        # float32 factors leave the fit a few millionths off round values such as 1 and 4: try those first
        candidates = [(float(f"{low:.4g}"), float(f"{low + 1 / slope:.4g}")), (low, low + 1 / slope)]
    for low, high in candidates:
        scaling = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT,
        }
        if factor >= 1 and torch.allclose(llama3_rope_factors(scaling, theta, head_dim), factors, rtol=1e-5, atol=0):
            return scaling
    raise ConfigError(f"{source}: the RoPE factors in {ROPE_FREQS} are not those of a Llama 3 rope scaling")


def llama3_rope_factors(scaling: dict[str, Any], theta: float, head_dim: int) -> Tensor:
    """The per-frequency RoPE factors llama.cpp's converter writes as `rope_freqs.weight` for a Llama 3 scaling."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    blend = ((scaling["original_max_position_embeddings"] / wavelength - low) / (high - low)).clamp(0, 1)
    return 1 / ((1 - blend) / scaling["factor"] + blend)
