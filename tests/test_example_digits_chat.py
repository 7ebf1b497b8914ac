"""examples/digits_chat.py composes a language model with trained towers, shows conversations and scores prose."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import mmfm
from mmfm.data.digits_chat import FAMILIES, write_digits_chat

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_chat.py"
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_HEADS = {"contrastive": None, "classify": None, "image_gen": None}


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("digits_chat", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def composed(example, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny text-only chat LM, tiny towers with a classifier, and the model `compose` made of them."""
    root = tmp_path_factory.mktemp("digits_chat")
    torch.manual_seed(0)
    text = {"chat_template": TEMPLATE, "max_length": 160}
    mmfm.create_model("mmfm-test", image=None, audio=None, text=text, **NO_HEADS).save_pretrained(root / "llm")
    mmfm.create_model("mmfm-test", contrastive=None, image_gen=None).save_pretrained(root / "towers")
    example.main(
        ["compose", "--llm", str(root / "llm"), "--towers", str(root / "towers"), "--out", str(root / "start")]
    )
    return {name: root / name for name in ("llm", "towers", "start")}


def test_compose_keeps_the_language_model_and_the_towers_encoders(composed):
    llm, towers, start = (mmfm.load(composed[name]) for name in ("llm", "towers", "start"))
    for key, value in llm.state_dict().items():
        assert torch.equal(start.state_dict()[key], value), key
    for key, value in towers.encoders.state_dict().items():
        assert torch.equal(start.encoders.state_dict()[key], value), key
    assert set(start.projectors) == {"image", "audio"} and list(start.heads) == ["caption"]
    assert start.config.text.chat_template == TEMPLATE


def test_samples_show_one_conversation_per_family_and_two_turns(example, composed, tmp_path, capsys):
    data = write_digits_chat(
        tmp_path / "data",
        limit=40,
        conversations=60,
        stage1_conversations=3,
        val_per_family=1,
        clips_per_digit=1,
        val_clips_per_digit=1,
        tones_per_digit=1,
        val_tones_per_digit=1,
    )
    example.main(["samples", "--model", str(composed["start"]), "--data", str(data)])
    printed = capsys.readouterr().out
    for family in FAMILIES:
        assert f"[{family}]" in printed
    assert printed.count("  model: ") == len(FAMILIES) + 2  # and the two-turn conversation's replies
    assert "[two turns]" in printed


def test_perplexity_of_an_unchanged_language_model_equals_the_originals(example, composed, tmp_path, capsys):
    out = tmp_path / "perplexity.json"
    example.main(["perplexity", "--model", str(composed["start"]), "--llm", str(composed["llm"]), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["ratio"] == 1.0 and result["model"] == result["original"] > 1.0
    assert "ratio 1.0000" in capsys.readouterr().out
