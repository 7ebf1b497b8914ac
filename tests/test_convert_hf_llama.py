"""Hugging Face llama / mistral / qwen2 folders as mmfm's backbone: parity with transformers on tiny random models
that transformers itself saved (logits, greedy generation with left padding), export back, and bad configs."""

from __future__ import annotations

import json

import pytest
import torch

import mmfm
from mmfm.convert.hf_llama import export_hf_llama
from mmfm.errors import ConfigError, InputError
from mmfm.text_pipeline import generate_token_ids, prompt_ids

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a picture of a seven; a voice saying eight",
    "What is the capital of France? The capital of France is Paris.",
    "Größe, café, naïve — déjà vu 😀 数字",
] * 20
PROMPTS = ["the quick", "What is the capital of France? The", "a voice saying eight, a picture of"]
COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.1,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
# model_type, transformers config class, extra config (tied or untied, rope scaling, a vocabulary padded past the
# tokenizer's), and whether the tokenizer's post-processor adds BOS
KINDS = {
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True), False),
    "llama3-untied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE, vocab_padding=20),
        True,
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, tie_word_embeddings=False), True),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True), False),
}


def _tokenizer(add_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
        )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    return fast


def _hf_folder(directory, kind: str):
    config_name, model_name, extra, add_bos = KINDS[kind]
    extra = dict(extra)
    tok = _tokenizer(add_bos)
    vocab = len(tok) + extra.pop("vocab_padding", 0)
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(
        **COMMON, **extra, vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    model = getattr(transformers, model_name)(config).eval()
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return model, tok


@pytest.fixture(scope="module", params=list(KINDS))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model, hf_tok = _hf_folder(directory, request.param)
    return directory, hf_model, hf_tok, mmfm.load(directory)


def _ids(hf_tok, texts):
    hf_tok.padding_side = "left"
    return hf_tok(texts, return_tensors="pt", padding=True)


def test_logits_equal_transformers(pair):
    directory, hf_model, hf_tok, model = pair
    batch = _ids(hf_tok, PROMPTS)
    with torch.no_grad():
        expected = hf_model(input_ids=batch["input_ids"][2:], attention_mask=batch["attention_mask"][2:]).logits
        ids = torch.tensor([prompt_ids(model, PROMPTS[2])])
        got = model(ids=ids, mask=torch.ones_like(ids, dtype=torch.bool)).logits
    assert ids.tolist() == batch["input_ids"][2:].tolist()  # the last prompt is the longest: no padding
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_greedy_generation_of_unequal_prompts_equals_transformers(pair):
    _, hf_model, hf_tok, model = pair
    batch = _ids(hf_tok, PROMPTS)
    with torch.no_grad():
        out = hf_model.generate(**batch, max_new_tokens=20, do_sample=False, pad_token_id=hf_tok.pad_token_id)
    expected = [_until_eos(row, hf_tok.eos_token_id) for row in out[:, batch["input_ids"].shape[1] :].tolist()]
    rows = [prompt_ids(model, p) for p in PROMPTS]
    assert generate_token_ids(model, rows, max_new_tokens=20) == expected
    # the same with the repetition penalty transformers applies
    with torch.no_grad():
        out = hf_model.generate(
            **batch, max_new_tokens=20, do_sample=False, repetition_penalty=1.5, pad_token_id=hf_tok.pad_token_id
        )
    expected = [_until_eos(row, hf_tok.eos_token_id) for row in out[:, batch["input_ids"].shape[1] :].tolist()]
    assert generate_token_ids(model, rows, max_new_tokens=20, repetition_penalty=1.5) == expected


def _until_eos(row, eos):
    return row[: row.index(eos)] if eos in row else row


def test_text_and_stream_and_chat_agree_with_transformers(pair):
    _, hf_model, hf_tok, model = pair
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = hf_tok.apply_chat_template(
        conversation, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = hf_model.generate(**rendered, max_new_tokens=12, do_sample=False, pad_token_id=hf_tok.pad_token_id)
    expected = hf_tok.decode(out[0, rendered["input_ids"].shape[1] :], skip_special_tokens=True)
    assert model.generate_text(messages=conversation, max_new_tokens=12) == expected
    assert "".join(model.generate_text(messages=conversation, max_new_tokens=12, stream=True)) == expected


def test_saved_and_reloaded_model_is_the_same(pair, tmp_path):
    _, _, _, model = pair
    model.save_pretrained(tmp_path / "saved")
    again = mmfm.load(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    assert again.config.text == model.config.text.__class__(
        **{**vars(model.config.text), "vocab": again.config.text.vocab}
    )
    ids = torch.tensor([prompt_ids(model, PROMPTS[1])])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(again(ids=ids, mask=mask).logits, model(ids=ids, mask=mask).logits)
    assert again.generate_text(PROMPTS, max_new_tokens=8) == model.generate_text(PROMPTS, max_new_tokens=8)


def test_export_to_hugging_face_gives_the_same_logits(pair, tmp_path):
    _, _, _, model = pair
    out = export_hf_llama(model, tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([prompt_ids(model, PROMPTS[1])])
    assert tok(PROMPTS[1])["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        expected = model(ids=ids, mask=torch.ones_like(ids, dtype=torch.bool)).logits
        torch.testing.assert_close(hf(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    conversation = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(conversation, tokenize=False) == ("<|im_start|>user\nhi<|im_end|>\n")


def test_a_language_model_joins_a_presets_encoders_with_base(tmp_path):
    _hf_folder(tmp_path, "llama-tied")
    alone = mmfm.load(tmp_path)
    with pytest.warns(UserWarning, match="freshly initialised"):
        joined = mmfm.load(tmp_path, base="mmfm-test")
    assert set(joined.encoders) == {"image", "audio"} and not alone.encoders
    assert joined.projectors["image"](torch.zeros(1, 3, joined.encoders["image"].width)).shape[-1] == 64
    for key, value in alone.state_dict().items():
        assert torch.equal(joined.state_dict()[key], value), key
    assert joined.generate_text(PROMPTS[0], max_new_tokens=6) == alone.generate_text(PROMPTS[0], max_new_tokens=6)
    captions = joined.caption(images=[torch.rand(3, 32, 32)], max_new_tokens=4)
    assert len(captions) == 1 and isinstance(captions[0], str)


def test_dtype_converts_the_weights_once(tmp_path):
    _hf_folder(tmp_path, "qwen2")
    full = mmfm.load(tmp_path)
    half = mmfm.load(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    ids = torch.tensor([prompt_ids(full, PROMPTS[1])])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(
            half(ids=ids, mask=mask).logits.float(), full(ids=ids, mask=mask).logits, atol=0.1, rtol=0.05
        )


def test_added_special_tokens_start_at_the_mean_and_leave_old_text_alone(tmp_path):
    _hf_folder(tmp_path, "llama3-untied")
    model = mmfm.load(tmp_path)
    rows = model.token_embedding.num_embeddings
    ids = torch.tensor([prompt_ids(model, PROMPTS[0])])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        before = model(ids=ids, mask=mask).logits
    new = model.add_special_tokens(["<image>", "<audio>", "<|im_end|>"])
    assert new[2] == model.tokenizer.token_to_id("<|im_end|>")  # an existing token keeps its id
    assert model.tokenizer.encode("a <image> b") == [
        *model.tokenizer.encode("a "),
        new[0],
        *model.tokenizer.encode(" b"),
    ]
    weight = model.token_embedding.weight
    assert weight.shape[0] == max(rows, model.tokenizer.vocab_size)
    if weight.shape[0] > rows:
        torch.testing.assert_close(weight[rows:], weight[:rows].mean(0).expand(weight.shape[0] - rows, -1))
    with torch.no_grad():
        after = model(ids=ids, mask=mask).logits
    torch.testing.assert_close(after[..., : before.shape[-1]], before)


def test_stop_strings_cut_the_text_and_sampling_is_seeded(tmp_path):
    _hf_folder(tmp_path, "llama-tied")
    model = mmfm.load(tmp_path)
    full = model.generate_text(PROMPTS[1], max_new_tokens=16)
    stop = full[3:5]
    assert model.generate_text(PROMPTS[1], max_new_tokens=16, stop=stop) == full[: full.index(stop)]
    assert (
        "".join(model.generate_text(PROMPTS[1], max_new_tokens=16, stop=[stop], stream=True))
        == full[: full.index(stop)]
    )
    a = model.generate_text(PROMPTS, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=0.8, seed=3)
    assert a == model.generate_text(PROMPTS, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=0.8, seed=3)


def test_unsupported_settings_are_listed_together(tmp_path):
    _hf_folder(tmp_path, "mistral")
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(
        hidden_act="gelu", sliding_window=32, mlp_bias=True, rope_parameters={"rope_type": "yarn", "factor": 4.0}
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as error:
        mmfm.load(tmp_path)
    for name in ("hidden_act 'gelu'", "sliding-window attention of 32 tokens", "mlp_bias", "rope scaling 'yarn'"):
        assert name in str(error.value)


def test_a_prompt_longer_than_the_context_is_refused_by_name(tmp_path):
    _hf_folder(tmp_path, "qwen2")
    model = mmfm.load(tmp_path)
    with pytest.raises(
        InputError, match=r"prompt 1 has \d+ tokens; the model reads at most backbone.max_seq_len = 128"
    ):
        model.generate_text(["short", "the quick brown fox " * 40])
    with pytest.raises(InputError, match="stream=True generates one text"):
        model.generate_text(["a", "b"], stream=True)
    with pytest.raises(InputError, match="prompts or messages="):
        model.generate_text()
