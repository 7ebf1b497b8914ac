"""`mmfm chat`: a conversation about images and sounds on stdin, answered as `model.chat` answers the same turns.

The model is a tiny random mmfm-test with a chat template (byte tokenizer, image and audio encoders); its weights
are scaled up so that replies depend on the input: at their initial scale every prompt gets the same reply, and a
lost or swapped file would go unnoticed.
"""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import mmfm
from mmfm.cli import main

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_HEADS = {"contrastive": None, "classify": None, "image_gen": None}
TOKENS = ["--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Saved models with a chat template ("model": image and audio encoders, "no_audio": an image encoder only) and
    one without ("no_template", text only); media files: images "a" and "b", audio "wav", and "broken" (a .png that
    holds text)."""
    root = tmp_path_factory.mktemp("cli_chat")
    torch.manual_seed(0)
    variants = {
        "model": {"text": {"chat_template": TEMPLATE}},
        "no_audio": {"text": {"chat_template": TEMPLATE}, "audio": None},
        "no_template": {"image": None, "audio": None},
    }
    models = {}
    for name, options in variants.items():
        model = mmfm.create_model("mmfm-test", **NO_HEADS, **options)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(3)
        model.save_pretrained(root / name)
        models[name] = str(root / name)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name)
    soundfile.write(root / "a.wav", 0.5 * np.sin(np.arange(8000) * 0.2).astype(np.float32), 16000)
    (root / "broken.png").write_text("not an image")
    names = {"a": "a.png", "b": "b.png", "wav": "a.wav", "broken": "broken.png"}
    return {**{key: str(root / name) for key, name in names.items()}, **models}


@pytest.fixture(scope="module")
def model(files: dict[str, str]):
    return mmfm.load(files["model"])


def chat(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, stdin: str | io.StringIO, *argv: str):
    """(exit code, stdout, stderr) of `mmfm chat ARGV` reading `stdin`."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin) if isinstance(stdin, str) else stdin)
    code = main(["chat", *argv, *TOKENS])
    out, err = capsys.readouterr()
    return code, out, err


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


class TerminalStdin(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("lines", "options"),
    [("/image {a}\n", []), ("", ["--image", "{a}"]), ("/image {a}\n", ["--no-stream"])],
    ids=["/image", "--image", "--no-stream"],
)
def test_attached_media_are_answered_as_model_chat_answers_them(capsys, monkeypatch, files, model, lines, options):
    stdin = lines.format(**files) + "What is it?\n/image {b}\n/audio {wav}\nAnd now?\n".format(**files)
    code, out, err = chat(capsys, monkeypatch, stdin, "--model", files["model"], *[o.format(**files) for o in options])
    assert code == 0, err
    first = [user("<image>\nWhat is it?")]
    reply = model.chat(first, images=[files["a"]], max_new_tokens=6)
    assert reply != model.chat(first, images=[files["b"]], max_new_tokens=6)  # the image shows in the reply
    second = [*first, {"role": "assistant", "content": reply}, user("<image><audio>\nAnd now?")]
    images, audio = [files["a"], files["b"]], [files["wav"]]
    assert out == f"{reply}\n{model.chat(second, images=images, audio=audio, max_new_tokens=6)}\n"
    assert err == ""  # piped: no prompt and no notes


def test_reset_forgets_the_conversation_and_its_media_attached_or_sent(capsys, monkeypatch, files, model):
    stdin = "/image {a}\nWhat is it?\n/image {b}\n/reset\nhi\n".format(**files)
    code, out, _ = chat(capsys, monkeypatch, stdin, "--model", files["model"], "--system", "Be brief.")
    assert code == 0
    system = {"role": "system", "content": "Be brief."}
    assert out.endswith(f"\n{model.chat([system, user('hi')], max_new_tokens=6)}\n")


def test_text_only_turns_get_generate_text_chats_replies(capsys, monkeypatch, files, model):
    messages = [user("hi")]
    assert model.chat(messages, max_new_tokens=6) == model.generate_text(messages=messages, max_new_tokens=6)
    code, out, _ = chat(capsys, monkeypatch, "hi\nand more\n", "--model", files["model"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nand more\n"))
    assert code == 0 and main(["generate-text", "--model", files["model"], "--chat", *TOKENS]) == 0
    assert out == capsys.readouterr().out and out.count("\n") == 2


def test_a_file_that_cannot_be_read_is_one_error_line_and_nothing_is_attached(capsys, monkeypatch, files, model):
    stdin = "/image missing.png\n/image {broken}\n/image\nhi\n".format(**files)
    code, out, err = chat(capsys, monkeypatch, stdin, "--model", files["model"])
    assert code == 0
    assert out == model.chat([user("hi")], max_new_tokens=6) + "\n"
    lines = err.splitlines()
    assert lines[0] == "mmfm: error: /image: 'missing.png': file not found; nothing attached"
    assert lines[1].startswith(f"mmfm: error: /image: '{files['broken']}': not a readable image file")
    assert lines[2] == "mmfm: error: /image needs a file: /image PATH" and len(lines) == 3


def test_audio_for_a_model_without_an_audio_encoder_is_refused(capsys, monkeypatch, files):
    code, out, err = chat(capsys, monkeypatch, "/audio {wav}\nhi\n".format(**files), "--model", files["no_audio"])
    assert code == 0 and out.count("\n") == 1  # the session went on: "hi" was answered
    assert err.startswith("mmfm: error: /audio: this model has no 'audio' encoder (it has: image)")
    code, out, err = chat(capsys, monkeypatch, "hi\n", "--model", files["no_audio"], "--audio", files["wav"])
    assert (code, out) == (2, "")
    assert err.startswith("mmfm: error: --audio: this model has no 'audio' encoder")


def test_at_a_terminal_notes_say_what_is_attached_and_a_failed_turn_drops_its_media(capsys, monkeypatch, files, model):
    stdin = TerminalStdin("/image {b}\nsay <image> twice\nWhat is it?\n".format(**files))
    code, out, err = chat(capsys, monkeypatch, stdin, "--model", files["model"], "--image", files["a"])
    assert code == 0
    assert f"attached image {files['a']} to your first message" in err
    assert f"attached image {files['b']} to your next message" in err
    assert "mmfm: error: messages hold 3 <image> placeholders but 2 image items were given" in err
    assert out == model.chat([user("What is it?")], max_new_tokens=6) + "\n"  # both images went with the failed turn


def test_end_of_input_ends_the_session_with_exit_code_0(capsys, monkeypatch, files):
    assert chat(capsys, monkeypatch, "", "--model", files["model"]) == (0, "", "")
    assert chat(capsys, monkeypatch, f"/image {files['a']}\n", "--model", files["model"]) == (0, "", "")


def test_help_lists_the_media_commands_only_in_mmfm_chat(capsys, monkeypatch, files):
    code, _, err = chat(capsys, monkeypatch, "/help\n", "--model", files["model"])
    assert code == 0 and "  /image PATH  attach an image file" in err and "  /audio PATH  " in err
    monkeypatch.setattr(sys, "stdin", io.StringIO("/help\n/image x.png\n"))
    assert main(["generate-text", "--model", files["model"], "--chat"]) == 0
    err = capsys.readouterr().err
    assert "/image" not in err.split("unknown command")[0] and "unknown command '/image'" in err


def test_a_model_without_a_chat_template_is_one_error_line(capsys, monkeypatch, files):
    code, out, err = chat(capsys, monkeypatch, "hi\n", "--model", files["no_template"])
    assert (code, out) == (2, "")
    assert err.startswith(f"mmfm: error: chat: the model {files['no_template']} has no chat template")
