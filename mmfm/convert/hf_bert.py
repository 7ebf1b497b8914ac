"""Hugging Face BERT-family text encoders (and sentence-transformers models built on them) -> an mmfm text tower.

```python
converted = mmfm.convert.convert("hf_bert", "all-MiniLM-L6-v2/")   # config.json, weights, vocab.txt, ST files
model, _ = mmfm.loader.from_converted(converted, "mmfm-tiny")
model = mmfm.load("all-MiniLM-L6-v2/", base="mmfm-tiny")           # the same: config.json says model_type "bert"
model.embed(text=["a cat sits on the mat"])                         # sentence-transformers' embedding
```

The directory is a Hugging Face `save_pretrained` directory of a `BertModel` (or a `Bert*` task model, whose
`bert.` prefix is removed and whose task heads are dropped), optionally a sentence-transformers model directory:
`modules.json` names the Transformer module's folder and the Pooling module, whose config gives the pooling
("mean", "cls" or "lasttoken"); a Normalize module changes nothing, since mmfm's embeddings are unit vectors
anyway. Without sentence-transformers files, pooling is "mean" (what sentence-transformers builds around a plain
model) unless `pooling` says otherwise. The tokenizer is mmfm's WordPiece over the directory's vocab.txt (or the
vocabulary in tokenizer.json, which is all transformers 5 saves) with the casing of its tokenizer_config.json;
texts are cut at sentence-transformers' `max_seq_length`.

Key map (HF -> `towers.text.`): embeddings.{word,position,token_type}_embeddings -> token_embed / pos_embed /
type_embed, embeddings.LayerNorm -> norm_embed, and per layer attention.self.{query,key,value} -> attn.qkv
(concatenated: explicit tensor surgery), attention.output.dense -> attn.proj, attention.output.LayerNorm -> norm1,
intermediate.dense -> mlp.fc1, output.dense -> mlp.fc2, output.LayerNorm -> norm2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmfm.config import ContrastiveHeadConfig, EmbeddingSourceConfig, TextConfig, TextTowerConfig
from mmfm.convert import Converted, register_converter
from mmfm.convert.io import read_hf_state_dict
from mmfm.convert.keys import check_shapes, rename
from mmfm.encoders.text_tower import TextTower
from mmfm.encoders.tokenizers import WordPieceTokenizer
from mmfm.errors import CheckpointError, ConfigError

PREFIX = "towers.text."
MODEL_TYPES = ("bert",)
# Hugging Face hidden_act -> TextTowerConfig.act
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}
# sentence-transformers pooling modes -> TextTowerConfig.pooling
POOLING = {"mean": "mean", "cls": "cls", "lasttoken": "eot"}
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Entries that are no part of the encoder: the position-id buffer, the NSP pooler, and pretraining heads.
_DROPPED_PREFIXES = ("embeddings.position_ids", "embeddings.token_type_ids", "pooler.", "cls.")

_LAYER = "encoder.layer.{}."
KEY_MAP = {
    "embeddings.word_embeddings.weight": "token_embed.weight",
    "embeddings.position_embeddings.weight": "pos_embed",
    "embeddings.token_type_embeddings.weight": "type_embed",
    "embeddings.LayerNorm.weight": "norm_embed.weight",
    "embeddings.LayerNorm.bias": "norm_embed.bias",
    **{
        _LAYER + src + "." + param: "blocks.{}." + dst + "." + param
        for src, dst in (
            ("attention.self.query", "attn.q"),  # q, k and v are concatenated into attn.qkv below
            ("attention.self.key", "attn.k"),
            ("attention.self.value", "attn.v"),
            ("attention.output.dense", "attn.proj"),
            ("attention.output.LayerNorm", "norm1"),
            ("intermediate.dense", "mlp.fc1"),
            ("output.dense", "mlp.fc2"),
            ("output.LayerNorm", "norm2"),
        )
        for param in ("weight", "bias")
    },
}


@register_converter("hf_bert", hf_model_types=MODEL_TYPES)
def convert_hf_bert(path: str | Path, pooling: str | None = None, max_length: int | None = None) -> Converted:
    """Reads a Hugging Face BERT-family directory (optionally a sentence-transformers one) as an mmfm text tower.

    Args:
        path: the model directory.
        pooling: "mean", "cls" or "eot" (the [SEP] token); default: the sentence-transformers Pooling module's,
            else "mean".
        max_length: most tokens per text, [CLS] and [SEP] included; default: sentence-transformers'
            `max_seq_length`, else the tokenizer's `model_max_length`, at most the model's positions.

    Returns:
        {"text": TextConfig (wordpiece tokenizer + "bert" tower), "contrastive": text from the tower} and the
        weights under `towers.text.`.

    Raises:
        ConfigError: not a BERT-family config, or settings mmfm does not model (named).
        CheckpointError: missing files, or weights that do not fit the config (keys listed).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: a Hugging Face model is a directory (config.json, weights, vocab.txt)")
    modules = _read_json(directory / "modules.json", required=False)
    model_dir, st_pooling = _sentence_transformers_layout(directory, modules)
    hf = _read_json(model_dir / "config.json", required=True)
    tokenizer = _read_json(model_dir / "tokenizer_config.json", required=False) or {}
    st_config = _read_json(model_dir / "sentence_bert_config.json", required=False) or {}
    # transformers < 5 saves vocab.txt; transformers 5 only tokenizer.json, which holds the same vocabulary.
    vocab = next((model_dir / n for n in ("vocab.txt", "tokenizer.json") if (model_dir / n).is_file()), None)
    if vocab is None:
        raise CheckpointError(f"{model_dir}: no vocab.txt or tokenizer.json (the WordPiece vocabulary)")
    normalizer = (_read_json(vocab, required=True).get("normalizer") or {}) if vocab.suffix == ".json" else {}

    tower = _tower_config(hf, pooling or st_pooling or "mean", str(model_dir / "config.json"))
    num_tokens = WordPieceTokenizer(vocab).vocab_size
    if num_tokens != tower.vocab_size:
        raise CheckpointError(f"{vocab}: {num_tokens} tokens, but config.json says vocab_size {tower.vocab_size}")
    if tokenizer.get("tokenize_chinese_chars", normalizer.get("handle_chinese_chars")) is False:
        raise ConfigError(f"{model_dir}: tokenize_chinese_chars=false; mmfm's WordPiece always splits CJK characters")
    lowercase = bool(tokenizer.get("do_lower_case", normalizer.get("lowercase", True)))
    strip_accents = tokenizer.get("strip_accents", normalizer.get("strip_accents"))
    limit = max_length or st_config.get("max_seq_length") or tokenizer.get("model_max_length") or tower.context_length
    text = TextConfig(
        tokenizer="wordpiece",
        max_length=min(int(limit), tower.context_length),
        vocab=str(vocab.absolute()),
        # sentence-transformers may lowercase before a cased tokenizer; accents then follow the tokenizer's casing
        lowercase=lowercase or bool(st_config.get("do_lower_case")),
        strip_accents=lowercase if strip_accents is None else bool(strip_accents),
        tower=tower,
    )
    state, weights = read_hf_state_dict(model_dir)
    out = _remap(state, tower, str(weights))
    contrastive = ContrastiveHeadConfig(embed_dim=tower.out_dim, source=EmbeddingSourceConfig(text="tower"))
    return Converted({"text": text, "contrastive": contrastive}, {PREFIX + k: v for k, v in out.items()})


def _read_json(path: Path, required: bool) -> Any:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: missing; a Hugging Face model directory needs it")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None


def _sentence_transformers_layout(directory: Path, modules: Any) -> tuple[Path, str | None]:
    """The Transformer module's directory and the Pooling module's mode, from sentence-transformers' modules.json."""
    if modules is None:
        return directory, None
    model_dir, pooling, others = directory, None, []
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer":
            model_dir = directory / module.get("path", "")
        elif kind == "Pooling":
            pooling = _pooling_mode(directory / module.get("path", ""))
        elif kind != "Normalize":  # mmfm's embeddings are always unit vectors
            others.append(module.get("type"))
    if others:
        raise ConfigError(
            f"{directory / 'modules.json'}: sentence-transformers modules mmfm does not model: {', '.join(others)} "
            "(it reads Transformer, Pooling and Normalize)"
        )
    return model_dir, pooling


def _pooling_mode(pooling_dir: Path) -> str:
    config = _read_json(pooling_dir / "config.json", required=True)
    mode = config.get("pooling_mode")
    if mode is None:  # sentence-transformers < 6: one boolean per mode
        mode = [name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key)]
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1 or modes[0] not in POOLING:
        raise ConfigError(
            f"{pooling_dir / 'config.json'}: pooling {modes} is not one of the modes mmfm models ({', '.join(POOLING)})"
        )
    if config.get("include_prompt", True) is False:
        raise ConfigError(f"{pooling_dir / 'config.json'}: include_prompt=false is not modelled")
    return POOLING[modes[0]]


def _tower_config(hf: dict[str, Any], pooling: str, source: str) -> TextTowerConfig:
    if hf.get("model_type") not in MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {hf.get('model_type')!r} is not a BERT-family encoder this converter reads "
            f"({', '.join(MODEL_TYPES)})"
        )
    if pooling not in POOLING.values():
        raise ConfigError(f"pooling must be one of {', '.join(POOLING.values())}, got {pooling!r}")
    problems = []
    if hf.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type={hf['position_embedding_type']!r}")
    if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
        problems.append(f"hidden_act={hf['hidden_act']!r}")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        problems.append("is_decoder / add_cross_attention")
    if problems:
        raise ConfigError(f"{source}: settings mmfm's BERT tower does not model: {', '.join(problems)}")
    return TextTowerConfig(
        kind="bert",
        vocab_size=hf["vocab_size"],
        context_length=hf.get("max_position_embeddings", 512),
        width=hf["hidden_size"],
        depth=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"],
        act=ACTIVATIONS[hf.get("hidden_act", "gelu")],
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        type_vocab_size=hf.get("type_vocab_size", 2),
        pooling=pooling,
        embed_dim=None,
    )


def _remap(state: dict[str, Tensor], tower: TextTowerConfig, source: str) -> dict[str, Tensor]:
    """HF BERT keys -> TextTower keys, q/k/v fused, checked against the tower the config describes."""
    if any(k.startswith("bert.") for k in state):  # a Bert*For* task model: the encoder sits under bert.
        state = {k.removeprefix("bert."): v for k, v in state.items() if k.startswith("bert.")}
    state = {_modern_name(k): v for k, v in state.items() if not k.startswith(_DROPPED_PREFIXES)}
    out = rename(state, KEY_MAP, source)
    for i in range(tower.depth):
        parts = [f"blocks.{i}.attn.{p}" for p in ("q", "k", "v")]
        for param in ("weight", "bias"):
            if all(f"{p}.{param}" in out for p in parts):
                out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([out.pop(f"{p}.{param}") for p in parts])
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in TextTower(tower).state_dict().items()}
    what = f"a BERT of width {tower.width}, {tower.depth} layers, {tower.context_length} positions, as config.json says"
    check_shapes(expected, out, source, what)
    return out


def _modern_name(key: str) -> str:
    """Checkpoints converted from the original TensorFlow BERT call LayerNorm's parameters gamma and beta."""
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
