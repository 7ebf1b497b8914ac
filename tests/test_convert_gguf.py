"""GGUF -> mmfm: tiny random Llama/Qwen2 models written as GGUF the way llama.cpp writes them, and SmolLM2's file."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import mmfm
import mmfm.convert.gguf as gguf_convert
from mmfm.convert import convert
from mmfm.convert.gguf import (
    KEY_MAP,
    hf_config_from_gguf,
    hf_state_from_gguf,
    llama3_rope_factors,
    read_gguf,
    unpermute,
)
from mmfm.errors import CheckpointError, ConfigError

HEADS, KV_HEADS = 4, 2
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [f"{a} {b}" for a in "etaoin" for b in "etaoin"] + [f"Ġ {c}" for c in "tawsb"]
# GGUF name -> Hugging Face name, as llama.cpp's converter maps them (written out here, not taken from the module)
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    **{f"mlp.{p}_proj.weight": f"ffn_{p}.weight" for p in ("gate", "up", "down")},
    **{f"self_attn.{p}_proj.{w}": f"attn_{p}.{w}" for p in "qkv" for w in ("weight", "bias")},
}


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character per byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


TOKENS = SPECIALS + _byte_chars() + [m.replace(" ", "") for m in MERGES]  # 300 tokens


def _gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        index, rest = hf_name.removeprefix("model.layers.").split(".", 1)
        return f"blk.{index}.{GGUF_NAMES[rest]}"
    return GGUF_NAMES[hf_name]


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _tiny(arch: str = "llama", tied: bool = False, **config):
    """A tiny random transformers LM: width 64, 2 layers, 4 heads, 2 KV heads, 300 tokens, well separated logits."""
    torch.manual_seed(0)
    settings = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=HEADS)
    settings.update(num_key_value_heads=KV_HEADS, vocab_size=len(TOKENS), max_position_embeddings=128)
    settings.update(initializer_range=0.2, rms_norm_eps=1e-6, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**settings, **config)).eval()
        with torch.no_grad():  # Qwen2 starts its biases at zero
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.2)
        return model
    return LlamaForCausalLM(LlamaConfig(**settings, **config)).eval()


def _write_gguf(path: Path, model, qtype: Q = Q.F32, arch: str = "llama", rope_freqs: np.ndarray | None = None) -> Path:
    """`model` as llama.cpp's converter writes it: its metadata, a byte-level BPE tokenizer, q/k permuted for llama,
    2-D weights in `qtype` and norms (and biases) in F32."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == Q.F32 else gguf.LlamaFileType.MOSTLY_Q8_0)
    if arch == "llama":
        writer.add_vocab_size(c.vocab_size)
        writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        array = tensor.numpy()
        if arch == "llama" and "q_proj" in name:
            array = _permute(array, c.num_attention_heads)
        elif arch == "llama" and "k_proj" in name:
            array = _permute(array, c.num_key_value_heads)
        if array.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(_gguf_name(name), array)
        else:
            writer.add_tensor(_gguf_name(name), quantize(array, qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _reference(tensor) -> torch.Tensor:
    """gguf's own dequantization of a reader tensor, in PyTorch's dimension order."""
    return torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type))).reshape(
        tuple(reversed(tensor.shape.tolist()))
    )


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tensors_are_ggufs_own_dequantization_and_the_original_weights(tmp_path, arch, qtype):
    model = _tiny(arch)
    path = _write_gguf(tmp_path / "tiny.gguf", model, qtype, arch)

    file = read_gguf(path)
    tensors = dict(file.tensors())
    assert list(tensors) == [t.name for t in file.reader.tensors]
    for t in file.reader.tensors:
        assert torch.equal(tensors[t.name], _reference(t)), t.name
    hf = hf_config_from_gguf(file)
    state = hf_state_from_gguf(file, hf)

    original = model.state_dict()
    assert set(state) == set(original)
    for name, tensor in state.items():
        gguf_tensor = tensors[_gguf_name(name)]
        if arch == "llama" and ("q_proj" in name or "k_proj" in name):
            heads = HEADS if "q_proj" in name else KV_HEADS
            gguf_tensor = unpermute(gguf_tensor, heads)
        assert torch.equal(tensor, gguf_tensor), name
        if qtype == Q.F32:
            assert torch.equal(tensor, original[name]), name
        else:  # Q8_0: within half a quantization step of the block's largest value / 127
            torch.testing.assert_close(tensor, original[name], atol=original[name].abs().max() / 127, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_supported_tensor_type_dequantizes_as_gguf_does(tmp_path, dtype):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((4, 256)).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "types.gguf"), "llama")
    for name in gguf_convert.TENSOR_TYPES:
        qtype = Q[name]
        try:
            data = quantize(values, qtype)
        except NotImplementedError:  # gguf cannot quantize to K-quants: bytes whose every float16 field is finite
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            data = rng.integers(0, 0x7C, (4, 256 // block * size), dtype=np.uint8)
        writer.add_tensor(name, data, raw_dtype=None if name in ("F32", "F16") else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    file = read_gguf(tmp_path / "types.gguf")
    for t in file.reader.tensors:
        out = file.tensor(t.name, dtype)
        assert out.dtype == dtype and out.shape == (4, 256), t.name
        assert torch.equal(out, _reference(t).to(dtype)), t.name
    assert sorted(t.tensor_type.name for t in file.reader.tensors) == sorted(gguf_convert.TENSOR_TYPES)


@pytest.mark.parametrize("tied", [False, True])
def test_config_from_metadata(tmp_path, tied):
    model = _tiny(tied=tied)
    file = read_gguf(_write_gguf(tmp_path / "tiny.gguf", model))

    hf = hf_config_from_gguf(file)

    c = model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert hf[key] == getattr(c, key), key
    assert hf["model_type"] == "llama" and hf["tie_word_embeddings"] is tied and "rope_scaling" not in hf
    assert hf["vocab_size"] == len(TOKENS) and hf["max_position_embeddings"] == 128 and hf["head_dim"] == 16
    assert hf["rope_theta"] == c.rope_parameters["rope_theta"] and hf["rms_norm_eps"] == pytest.approx(1e-6)
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (1, 2, 0)
    assert ("lm_head.weight" in hf_state_from_gguf(file, hf)) is not tied


def test_llama3_rope_scaling_comes_back_from_rope_freqs(tmp_path):
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 32.0,
        "original_max_position_embeddings": 8192,
    }
    model = _tiny(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config)
    base = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    factors = (base / scaled.double()).numpy()  # what llama.cpp writes as rope_freqs.weight
    file = read_gguf(_write_gguf(tmp_path / "tiny.gguf", model, rope_freqs=factors))

    hf = hf_config_from_gguf(file)

    assert hf["rope_scaling"] == {"rope_type": "llama3", **scaling}
    assert set(hf_state_from_gguf(file, hf)) == set(model.state_dict())  # the factors are no weight
    recovered = llama3_rope_factors(hf["rope_scaling"], 500000.0, 16)
    torch.testing.assert_close(recovered, torch.from_numpy(factors), rtol=1e-6, atol=0)  # transformers: float32


def test_rope_factors_that_are_no_llama3_scaling_are_refused(tmp_path):
    factors = np.linspace(1.0, 3.0, 8)[::-1].copy()
    file = read_gguf(_write_gguf(tmp_path / "tiny.gguf", _tiny(), rope_freqs=factors))
    with pytest.raises(ConfigError, match="rope_freqs.weight"):
        hf_config_from_gguf(file)


def test_convert_hands_over_config_tokenizer_and_text_settings(tmp_path):
    """convert_gguf's own part: the text section, the dtype, the name and the tokenizer, around hf_llama."""
    path = _write_gguf(tmp_path / "tiny.gguf", _tiny())

    config, state = converted = convert("gguf", path, dtype=torch.bfloat16)

    text = {k: v for k, v in config["text"].items() if k not in ("vocab_size", "max_length")}
    assert text == {
        "tokenizer": "hf",
        "vocab": None,
        "chat_template": CHATML,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "stop_tokens": [],
    }
    assert converted.tokenizer.eos_id == TOKENS.index("<|im_end|>") and converted.tokenizer.vocab_size == len(TOKENS)
    assert config["backbone"].depth == 2 and all(t.dtype == torch.bfloat16 for t in state.values())
    assert "backbone.blocks.1.attn.qkv.weight" in state and converted.base.image is None


@pytest.mark.parametrize("tied", [False, True])
def test_logits_equal_transformers(tmp_path, tied):
    model = _tiny(tied=tied)
    path = _write_gguf(tmp_path / "tiny.gguf", model)
    ids = torch.tensor([[1, 5, 60, 299, 17, 42, 3], [1, 8, 80, 260, 100, 2, 9]])

    mm = mmfm.load(path)

    with torch.no_grad():
        ours = mm.caption_logits({}, ids, torch.ones_like(ids, dtype=torch.bool))
        torch.testing.assert_close(ours, model(ids).logits, rtol=0, atol=1e-5)


# The real SmolLM2-135M-Instruct file, against transformers' own GGUF loader


@pytest.fixture(scope="module")
def smollm2(smollm2_file, smollm2_reference):
    """transformers' float32 GGUF load of SmolLM2, and mmfm's reading of the same file."""
    file = read_gguf(smollm2_file)
    return smollm2_reference[0], file, hf_config_from_gguf(file)


def test_smollm2_weights_equal_transformers_gguf_load(smollm2):
    reference, file, hf = smollm2
    expected = reference.state_dict()

    state = hf_state_from_gguf(file, hf)

    assert set(state) == set(expected) - {"lm_head.weight"}  # tied: transformers shares the embedding
    worst = max(float((state[k] - expected[k]).abs().max()) for k in state)
    assert worst == 0.0
    assert all(t.dtype == torch.float32 for t in state.values())


def test_smollm2_config_equals_transformers(smollm2):
    reference, file, hf = smollm2
    c = reference.config
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    keys += ("head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size", "tie_word_embeddings")
    keys += ("bos_token_id", "eos_token_id", "pad_token_id", "model_type")
    assert {k: hf[k] for k in keys} == {k: getattr(c, k) for k in keys}
    assert hf["rope_theta"] == c.rope_parameters["rope_theta"] == 100000.0 and "rope_scaling" not in hf
    assert file.metadata["tokenizer.chat_template"].startswith("{% for message in messages %}")
    assert KEY_MAP["output.weight"] == "lm_head.weight" and "output.weight" not in file.tensor_names


# Bad input


def test_unsupported_architecture_is_named(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"mamba\.gguf: general\.architecture 'mamba' .*\(llama, qwen2\)"):
        convert("gguf", tmp_path / "mamba.gguf")


def test_unsupported_tensor_types_are_all_named(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 256), np.float32))
    for name, qtype in (("blk.0.ffn_down.weight", Q.IQ2_XXS), ("blk.0.ffn_up.weight", Q.TQ1_0)):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor(name, np.zeros((8, 256 // block * size), np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError) as error:
        read_gguf(tmp_path / "iq.gguf")
    message = str(error.value)
    assert "iq.gguf: 2 tensors of types" in message
    assert "blk.0.ffn_down.weight (IQ2_XXS), blk.0.ffn_up.weight (TQ1_0)" in message


@pytest.mark.parametrize("keep", [0.5, -5, -1])
def test_truncated_file_is_refused_by_name(tmp_path, keep):
    data = _write_gguf(tmp_path / "tiny.gguf", _tiny()).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: .*(truncated|corrupt)"):
        convert("gguf", cut)


def test_missing_padding_after_the_last_tensor_is_truncation(tmp_path):
    """llama.cpp pads every tensor's data to the alignment, the last one too, and reads the padding."""
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.ones((3,), np.float32))  # 12 bytes, padded to 32
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "tiny.gguf").read_bytes()[:-5])
    read_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(CheckpointError, match=r"cut\.gguf: truncated .* token_embd\.weight's data ends at byte"):
        read_gguf(tmp_path / "cut.gguf")


@pytest.mark.parametrize("content", [b"", b"GGU", b"PK\x03\x04 not a gguf file at all" * 10])
def test_not_a_gguf_file_is_refused(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.gguf: not a GGUF file"):
        convert("gguf", path)


def test_corrupt_header_is_refused_without_hanging(tmp_path):
    """A metadata array length of 2**60 makes GGUFReader loop over reads past the end of the file; not here."""
    data = bytearray(_write_gguf(tmp_path / "tiny.gguf", _tiny()).read_bytes())
    at = data.find(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4 + 4  # key, value type, item type
    data[at : at + 8] = (2**60).to_bytes(8, "little")
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"bad\.gguf: not a readable GGUF file"):
        read_gguf(tmp_path / "bad.gguf")


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_gguf(tmp_path)
