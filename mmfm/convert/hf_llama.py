"""Hugging Face Llama-family language models (llama, mistral, qwen2) <-> mmfm's backbone, both ways.

```python
model = mmfm.load("SmolLM2-135M-Instruct/")                    # config.json model_type "llama": a text-only LM
model = mmfm.load("SmolLM2-135M-Instruct/", base="mmfm-tiny")  # the LM as backbone, mmfm-tiny's encoders around it
converted = mmfm.convert.convert("hf_llama", "TinyLlama-1.1B/")
export_hf_llama(model, "out/")                                 # back: a folder transformers and llama.cpp read
```

The folder is what transformers' `save_pretrained` writes: config.json, model.safetensors (or shards with an
index; a pytorch_model.bin only through `torch.load(weights_only=True)`), tokenizer.json, tokenizer_config.json
(special tokens and the chat template, or chat_template.jinja beside it) and generation_config.json (its EOS ids
end generation too). What mmfm's backbone cannot represent is refused, every problem listed in one error:
another activation than SiLU, biases other than qwen2's q/k/v, a head width other than hidden / heads, RoPE
scalings other than "llama3", sliding-window attention that is in use.

Key map (HF -> mmfm), one template per block (`keys.rename`):

| Hugging Face                                      | mmfm                                         |
|---------------------------------------------------|----------------------------------------------|
| model.embed_tokens.weight                         | token_embedding.weight                       |
| model.layers.N.input_layernorm.weight             | backbone.blocks.N.attn_norm.weight           |
| model.layers.N.self_attn.{q,k,v}_proj.{weight,bias} | backbone.blocks.N.attn.qkv.{weight,bias}: q, k, v stacked |
| model.layers.N.self_attn.o_proj.weight            | backbone.blocks.N.attn.proj.weight           |
| model.layers.N.post_attention_layernorm.weight    | backbone.blocks.N.mlp_norm.weight            |
| model.layers.N.mlp.{gate,up}_proj.weight          | backbone.blocks.N.mlp.gate_up.weight: gate, up stacked |
| model.layers.N.mlp.down_proj.weight               | backbone.blocks.N.mlp.down.weight            |
| model.norm.weight                                 | backbone.norm.weight                         |
| lm_head.weight (untied models)                    | heads.caption.lm_head.weight                 |

Both use rotate-half RoPE, so q and k need no permutation (GGUF's do: see `mmfm.convert.gguf`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mmfm.config import (
    BackboneConfig,
    CaptionHeadConfig,
    ModelConfig,
    RopeScalingConfig,
    read_small_file,
)
from mmfm.convert import Converted, register_converter
from mmfm.convert.io import read_hf_state_dict
from mmfm.convert.keys import rename
from mmfm.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from torch import nn

MODEL_TYPES = ("llama", "mistral", "qwen2")
# A text-only model: what a converted language model becomes when no base with encoders is asked for.
TEXT_ONLY = ModelConfig(name="text-only", image=None, audio=None, contrastive=None)
# The longest text one item may have, where the model's context allows it (media tokens need room beside it).
MAX_TEXT_LENGTH = 4096
MAX_TOKENIZER_CONFIG_BYTES = 16 * 2**20

_LAYER = "model.layers.{}."
_BLOCK = "backbone.blocks.{}."
KEY_MAP = {
    "model.embed_tokens.weight": "token_embedding.weight",
    "model.norm.weight": "backbone.norm.weight",
    "lm_head.weight": "heads.caption.lm_head.weight",
    **{
        _LAYER + src: _BLOCK + dst
        for src, dst in (
            ("input_layernorm.weight", "attn_norm.weight"),
            ("post_attention_layernorm.weight", "mlp_norm.weight"),
            ("self_attn.o_proj.weight", "attn.proj.weight"),
            ("mlp.down_proj.weight", "mlp.down.weight"),
            # stacked into attn.qkv and mlp.gate_up below
            *((f"self_attn.{p}_proj.{kind}", f"attn.{p}.{kind}") for p in "qkv" for kind in ("weight", "bias")),
            ("mlp.gate_proj.weight", "mlp.gate.weight"),
            ("mlp.up_proj.weight", "mlp.up.weight"),
        )
    },
}
# mmfm key -> the HF keys stacked (in this order, along rows) into it
_STACKED = {"attn.qkv": ("attn.q", "attn.k", "attn.v"), "mlp.gate_up": ("mlp.gate", "mlp.up")}
_STACK_OF = {part: target for target, parts in _STACKED.items() for part in parts}
_PART = re.compile(r"(backbone\.blocks\.\d+)\.(attn\.[qkv]|mlp\.gate|mlp\.up)\.(weight|bias)")


# ---- config ----


def config_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """mmfm components from a Hugging Face config.json of a llama, mistral or qwen2 model.

    Returns:
        A partial `ModelConfig` (`mmfm.convert.build_config`): "name", "backbone", "caption" and the "text"
        fields the weights fix (tokenizer "hf", vocab_size, max_length); the tokenizer's own fields are the
        caller's to add.

    Raises:
        ConfigError: naming `source` and every setting mmfm's backbone cannot represent, all together.
    """
    problems = []
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        problems.append(f"model_type {model_type!r} (supported: {', '.join(MODEL_TYPES)})")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if not isinstance(hf.get(k), int) or isinstance(hf.get(k), bool)]
    if missing:
        raise ConfigError(f"{source}: config.json lacks whole-number {', '.join(missing)}")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (mmfm's SwiGLU uses 'silu')")
    if heads < 1 or dim % heads:
        problems.append(f"num_attention_heads {heads} does not divide hidden_size {dim}")
    elif hf.get("head_dim") not in (None, dim // heads):
        problems.append(
            f"head_dim {hf['head_dim']} (mmfm's heads are hidden_size / num_attention_heads = {dim // heads})"
        )
    if hf.get("attention_bias"):
        problems.append("attention_bias true (biases on q, k, v and o; mmfm has q/k/v biases only, as qwen2)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias true (mmfm's SwiGLU has no biases)")
    rope, theta = _rope(hf, problems)
    problems += _sliding_window(hf)
    if problems:
        raise ConfigError(f"{source}: mmfm cannot represent this model:\n  " + "\n  ".join(problems))
    max_seq_len = hf.get("max_position_embeddings") or 2048
    backbone = BackboneConfig(
        dim=dim,
        depth=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        hidden_dim=hf["intermediate_size"],
        rope_theta=theta,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=max_seq_len,
        qkv_bias=model_type == "qwen2",
        rope_scaling=rope,
    )
    return {
        "name": str(hf.get("_name_or_path") or model_type).rstrip("/").rsplit("/", 1)[-1] or model_type,
        "backbone": backbone,
        "caption": CaptionHeadConfig(tied=bool(hf.get("tie_word_embeddings", True))),
        "text": {
            "tokenizer": "hf",
            "vocab_size": hf["vocab_size"],
            "max_length": min(MAX_TEXT_LENGTH, max_seq_len // 2),
        },
    }


_LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(hf: dict[str, Any], problems: list[str]) -> tuple[RopeScalingConfig | None, float]:
    """RoPE scaling and base from `rope_scaling` + `rope_theta` (transformers 4) or `rope_parameters` (5)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None, theta
    if kind != "llama3":
        problems.append(f"rope scaling {kind!r} (mmfm supports plain RoPE and 'llama3' scaling)")
        return None, theta
    absent = [k for k in _LLAMA3_FIELDS if not isinstance(params.get(k), (int, float))]
    if absent:
        problems.append(f"'llama3' rope scaling without {', '.join(absent)}")
        return None, theta
    scaling = RopeScalingConfig(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_seq_len=int(params["original_max_position_embeddings"]),
    )
    return scaling, theta


def _sliding_window(hf: dict[str, Any]) -> list[str]:
    window, context = hf.get("sliding_window"), hf.get("max_position_embeddings") or 0
    if hf.get("model_type") == "qwen2":
        in_use = bool(hf.get("use_sliding_window")) or "sliding_attention" in (hf.get("layer_types") or ())
    else:
        in_use = window is not None and window < context
    if in_use:
        return [
            f"sliding-window attention of {window} tokens (mmfm's attention is full; the window is in use below "
            f"max_position_embeddings {context})"
        ]
    return []


def config_to_hf(config: ModelConfig, tokenizer: Any) -> dict[str, Any]:
    """The Hugging Face config.json of an mmfm model's language model (`config_from_hf` inverted)."""
    bb, text = config.backbone, config.text
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": bb.rope_theta}
    if bb.rope_scaling is not None:
        s = bb.rope_scaling
        rope = {
            "rope_type": "llama3",
            "rope_theta": bb.rope_theta,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_seq_len,
        }
    model_type = "qwen2" if bb.qkv_bias else "llama"
    return {
        "architectures": ["Qwen2ForCausalLM" if bb.qkv_bias else "LlamaForCausalLM"],
        "model_type": model_type,
        "vocab_size": text.vocab_size or tokenizer.vocab_size,
        "hidden_size": bb.dim,
        "intermediate_size": bb.mlp_hidden_dim,
        "num_hidden_layers": bb.depth,
        "num_attention_heads": bb.num_heads,
        "num_key_value_heads": bb.kv_heads,
        "head_dim": bb.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": bb.max_seq_len,
        "rms_norm_eps": bb.norm_eps,
        "rope_parameters": rope,
        "rope_theta": bb.rope_theta,  # transformers 4 reads it here, and `rope_scaling` below
        "rope_scaling": None if bb.rope_scaling is None else rope,
        "tie_word_embeddings": config.caption is None or config.caption.tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": "float32",
        **({"use_sliding_window": False, "sliding_window": None} if bb.qkv_bias else {}),
    }


# ---- weights ----


def state_from_hf(state: dict[str, Tensor], hf: dict[str, Any], source: str) -> dict[str, Tensor]:
    """Hugging Face `LlamaForCausalLM`-style tensors -> `MultimodalModel` keys (see the module's key map).

    A tied model's `lm_head.weight`, if the file has one, is dropped (the head is the embedding); RoPE's
    `rotary_emb.inv_freq` buffers of old checkpoints are dropped (mmfm computes its own tables).

    Raises:
        CheckpointError: naming every unknown key, or q/k/v and gate/up weights whose shapes do not stack.
    """
    tied = bool(hf.get("tie_word_embeddings", True))
    state = {
        k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq") and not (tied and k == "lm_head.weight")
    }
    out: dict[str, Tensor] = {}
    groups: dict[tuple[str, str, str], dict[str, Tensor]] = {}  # (block, stacked name, kind) -> its parts found
    for key, tensor in rename(state, KEY_MAP, source).items():
        found = _PART.fullmatch(key)
        if found is None:
            out[key] = tensor
        else:
            block, part, kind = found.groups()
            groups.setdefault((block, _STACK_OF[part], kind), {})[part] = tensor
    problems = []
    for (block, stacked, kind), found in groups.items():
        target, names = f"{block}.{stacked}.{kind}", _STACKED[stacked]
        absent = [f"{block}.{p}.{kind}" for p in names if p not in found]
        if absent:
            problems.append(f"{target} needs {', '.join(names)}; missing {', '.join(absent)}")
        elif len({found[p].shape[1:] for p in names}) > 1:
            problems.append(f"{target}: parts of shapes {[tuple(found[p].shape) for p in names]} do not stack")
        else:
            out[target] = torch.cat([found[p] for p in names], dim=0)
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    return out


def state_to_hf(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """An mmfm language model's tensors -> Hugging Face `LlamaForCausalLM` keys (`state_from_hf` inverted).

    Only the text path is kept: the token embedding, the backbone and an untied LM head.
    """
    bb = config.backbone
    q_rows, kv_rows = bb.num_heads * bb.head_dim, bb.kv_heads * bb.head_dim
    inverse = {v: k for k, v in KEY_MAP.items()}
    out = {}
    for key, tensor in state.items():
        if not key.startswith(("token_embedding.", "backbone.", "heads.caption.")):
            continue
        if ".attn.qkv." in key or ".mlp.gate_up." in key:
            stacked = "attn.qkv" if ".attn.qkv." in key else "mlp.gate_up"
            block, kind = key.split(f".{stacked}.")
            sizes = [q_rows, kv_rows, kv_rows] if stacked == "attn.qkv" else [bb.mlp_hidden_dim] * 2
            pieces = [(f"{block}.{p}.{kind}", t) for p, t in zip(_STACKED[stacked], tensor.split(sizes, dim=0))]
        else:
            pieces = [(key, tensor)]
        for name, piece in pieces:
            out[_hf_name(name, inverse)] = piece.contiguous()
    return out


def _hf_name(key: str, inverse: dict[str, str]) -> str:
    if key in inverse:
        return inverse[key]
    block = key.split(".")[2]
    return inverse[key.replace(f".{block}.", ".{}.", 1)].format(block)


# ---- the converter ----


@register_converter("hf_llama", hf_model_types=MODEL_TYPES)
def convert_hf_llama(path: str | Path) -> Converted:
    """A Hugging Face llama / mistral / qwen2 folder -> a text-only mmfm language model (or a base's backbone).

    Args:
        path: the folder `save_pretrained` wrote (config.json, weights, tokenizer files).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: a Hugging Face model is a folder (config.json, weights, tokenizer.json)")
    hf = _read_json(folder / "config.json", required=True)
    config = config_from_hf(hf, str(folder / "config.json"))
    config["name"] = folder.resolve().name or config["name"]
    config["text"].update(tokenizer_fields(folder, hf))
    weights, source = read_hf_state_dict(folder)
    state = state_from_hf(weights, hf, str(source))
    return Converted(config, state, base=TEXT_ONLY)


def tokenizer_fields(folder: Path, hf: dict[str, Any]) -> dict[str, Any]:
    """`TextConfig` fields of the folder's tokenizer: tokenizer.json, special tokens, chat template, stop ids."""
    from tokenizers import Tokenizer as Backend

    vocab = folder / "tokenizer.json"
    if not vocab.is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json (mmfm reads Hugging Face 'fast' tokenizers)")
    settings = _read_json(folder / "tokenizer_config.json", required=False)
    template_file = folder / "chat_template.jinja"
    template = settings.get("chat_template")
    if template_file.is_file():
        template = read_small_file(
            template_file, "chat template", MAX_TOKENIZER_CONFIG_BYTES, "MAX_TOKENIZER_CONFIG_BYTES"
        )
    elif isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    fields = {"vocab": str(vocab), "chat_template": template if isinstance(template, str) else None}
    for name in ("bos_token", "eos_token", "pad_token"):
        value = settings.get(name)
        fields[name] = value.get("content") if isinstance(value, dict) else value
    generation = _read_json(folder / "generation_config.json", required=False)
    stop_ids = generation.get("eos_token_id", hf.get("eos_token_id"))
    stop_ids = stop_ids if isinstance(stop_ids, list) else [stop_ids] if isinstance(stop_ids, int) else []
    backend = Backend.from_file(str(vocab)) if stop_ids else None
    stops = [backend.id_to_token(i) for i in stop_ids] if backend is not None else []
    if fields["eos_token"] is None and stops:
        fields["eos_token"] = stops[0]
    fields["stop_tokens"] = [t for t in stops if t is not None and t != fields["eos_token"]]
    return fields


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: not found")
        return {}
    text = read_small_file(path, path.name, MAX_TOKENIZER_CONFIG_BYTES, "MAX_TOKENIZER_CONFIG_BYTES")
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ---- export ----


def export_hf_llama(model: nn.Module, directory: str | Path) -> Path:
    """Writes a model's language model as a Hugging Face folder that transformers loads (`LlamaForCausalLM`, or
    `Qwen2ForCausalLM` for q/k/v biases) and llama.cpp's converters read.

    The folder holds config.json, model.safetensors, generation_config.json, tokenizer.json and
    tokenizer_config.json (special tokens and the chat template). Media encoders and other heads are not part of a
    Llama and are left out.

    Raises:
        InputError: the model has no "hf" tokenizer (a Llama folder needs a tokenizer.json) or no caption head.
    """
    from safetensors.torch import save_file

    from mmfm.checkpoint import unique_state_dict
    from mmfm.errors import InputError

    config = model.config
    if config.text.tokenizer != "hf":
        raise InputError(
            f"exporting to hf_llama needs an 'hf' tokenizer (a tokenizer.json); this model's is "
            f"{config.text.tokenizer!r}"
        )
    model.head("caption")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = model.tokenizer
    hf = config_to_hf(config, tok)
    state = {k: v.detach().cpu() for k, v in unique_state_dict(model).items()}
    save_file(state_to_hf(state, config), str(out / "model.safetensors"), {"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    eos = tok.eos_ids  # EOS first, then the stop tokens', without repeats
    generation = {
        "bos_token_id": tok.bos_id,
        "eos_token_id": eos if len(eos) > 1 else eos[0],
        "pad_token_id": tok.pad_id,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tok.save_vocabulary(out / "tokenizer.json")
    text = config.text
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text.bos_token,
        "eos_token": text.eos_token,
        "pad_token": text.pad_token,
        "model_max_length": config.backbone.max_seq_len,
        "clean_up_tokenization_spaces": False,
        **({"chat_template": text.chat_template} if text.chat_template else {}),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return out
