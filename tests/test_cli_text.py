"""`mmfm generate-text` (prompts, --as-chat, --chat) and `mmfm export`: what the CLI prints is what the API returns.

Tests that need the Hugging Face tokenizer (streaming text, exporting) or chat templates (rendering a conversation)
skip until those modules exist; the rest check the command's plumbing with a spy in place of the generation API.
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmfm
import mmfm.text_pipeline
from mmfm.cli import main
from mmfm.errors import InputError

# A small ChatML-like template: what `--as-chat` and `--chat` render conversations with.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEXT_ONLY = {"image": None, "audio": None, "contrastive": None, "classify": None, "image_gen": None}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Saved text-only mmfm-test models: "plain" (no chat template) and "chat" (with one)."""
    root = tmp_path_factory.mktemp("cli_text")
    torch.manual_seed(0)
    plain = mmfm.create_model("mmfm-test", **TEXT_ONLY)
    plain.save_pretrained(root / "plain")
    chat = mmfm.create_model("mmfm-test", **TEXT_ONLY, text={"chat_template": CHAT_TEMPLATE})
    chat.load_state_dict(plain.state_dict())
    chat.save_pretrained(root / "chat")
    return {"plain": str(root / "plain"), "chat": str(root / "chat")}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class Spy:
    """Stands in for `mmfm.text_pipeline.generate_text` (so for `model.generate_text`): records every call, with a
    copy of its messages, and answers with `replies` (a list of pieces per call, streamed or joined)."""

    def __init__(self, replies: list[list[str]] | None = None, interrupt_at: int | None = None):
        self.calls: list[dict] = []
        self.replies = replies
        self.interrupt_at = interrupt_at  # a call whose stream raises KeyboardInterrupt after its first piece

    def __call__(self, model, prompts=None, *, messages=None, stream=False, **options):
        call = len(self.calls)
        self.calls.append({"prompts": prompts, "messages": copy.deepcopy(messages), "stream": stream, **options})
        pieces = self.replies[call] if self.replies else [f"reply {call}"]
        if not stream:
            texts = ["".join(pieces)] * len(prompts if prompts is not None else messages)
            single = isinstance(prompts, str) or (messages is not None and isinstance(messages[0], dict))
            return texts[0] if single else texts
        return self._stream(pieces, call == self.interrupt_at)

    @staticmethod
    def _stream(pieces, interrupt):
        for i, piece in enumerate(pieces):
            if interrupt and i == 1:
                raise KeyboardInterrupt
            yield piece


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch):
    def install(**kwargs) -> Spy:
        fake = Spy(**kwargs)
        monkeypatch.setattr(mmfm.text_pipeline, "generate_text", fake)
        return fake

    return install


def with_stdin(monkeypatch: pytest.MonkeyPatch, text: str | io.StringIO) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text) if isinstance(text, str) else text)


# ---- prompts ----


def test_several_prompts_print_the_api_texts_one_line_each_in_order(capsys, models):
    model = mmfm.load(models["plain"])
    prompts = ["a cat", "the digit seven is", "x"]
    expected = model.generate_text(prompts, max_new_tokens=5)
    for batch in ([], ["--batch-size", "1"]):
        code, out, err = run(
            capsys, "generate-text", "--model", models["plain"], *prompts, "--max-new-tokens", "5", *batch
        )
        assert code == 0, err
        assert out.split("\n")[:-1] == [
            t.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") for t in expected
        ]


def test_json_prints_one_prompt_and_text_record_per_prompt(capsys, models):
    model = mmfm.load(models["plain"])
    prompts = ["a cat", "one two"]
    code, out, _ = run(capsys, "generate-text", "--model", models["plain"], *prompts, "--max-new-tokens", "4", "--json")
    assert code == 0
    expected = model.generate_text(prompts, max_new_tokens=4)
    assert [json.loads(line) for line in out.splitlines()] == [
        {"prompt": p, "text": t} for p, t in zip(prompts, expected)
    ]


def test_one_prompt_without_streaming_prints_the_api_text(capsys, models):
    model = mmfm.load(models["plain"])
    code, out, _ = run(
        capsys, "generate-text", "--model", models["plain"], "a cat", "--max-new-tokens", "6", "--no-stream"
    )
    assert code == 0
    assert out == model.generate_text("a cat", max_new_tokens=6) + "\n"


def test_one_prompt_streams_its_pieces_by_default_and_several_do_not(capsys, models, spy):
    fake = spy(replies=[["Par", "is", "."]])
    code, out, _ = run(capsys, "generate-text", "--model", models["plain"], "The capital of France is")
    assert code == 0 and out == "Paris.\n"
    assert fake.calls[0]["stream"] is True and fake.calls[0]["prompts"] == "The capital of France is"
    for argv in (["a", "b"], ["a", "--json"], ["a", "--no-stream"], ["a", "--num-beams", "2"]):
        fake = spy()
        assert run(capsys, "generate-text", "--model", models["plain"], *argv)[0] == 0
        assert fake.calls[0]["stream"] is False, argv


def test_the_decoding_options_reach_the_api_by_their_api_names(capsys, models, spy):
    fake = spy()
    argv = ["--max-new-tokens", "7", "--do-sample", "--temperature", "0.5", "--top-k", "3", "--top-p", "0.9"]
    argv += ["--repetition-penalty", "1.3", "--stop", "\n", "--stop", "END", "--seed", "11", "--batch-size", "2"]
    code, _, err = run(capsys, "generate-text", "--model", models["plain"], "a", "b", *argv)
    assert code == 0, err
    (call,) = fake.calls
    expected = {"max_new_tokens": 7, "do_sample": True, "temperature": 0.5, "top_k": 3, "top_p": 0.9}
    expected |= {"repetition_penalty": 1.3, "stop": ["\n", "END"], "seed": 11, "batch_size": 2}
    assert {k: call[k] for k in expected} == expected and call["prompts"] == ["a", "b"]


def test_as_chat_sends_each_prompt_as_a_user_turn_after_the_system_message(capsys, models, spy):
    fake = spy()
    argv = ["generate-text", "--model", models["chat"], "--as-chat", "hi", "what now?", "--system", "Be brief."]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    system = {"role": "system", "content": "Be brief."}
    assert fake.calls[0]["messages"] == [
        [system, {"role": "user", "content": "hi"}],
        [system, {"role": "user", "content": "what now?"}],
    ]
    assert out == "reply 0\nreply 0\n"


def test_as_chat_renders_with_the_models_template_as_the_api_does(capsys, models):
    pytest.importorskip("mmfm.chat_template")
    model = mmfm.load(models["chat"])
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "a cat"}]
    expected = model.generate_text(messages=conversation, max_new_tokens=5)
    argv = ["generate-text", "--model", models["chat"], "--as-chat", "a cat", "--system", "S", "--max-new-tokens", "5"]
    code, out, _ = run(capsys, *argv, "--no-stream")
    assert code == 0 and out == expected + "\n"


def test_streamed_text_is_the_whole_text(capsys, models):
    pytest.importorskip("mmfm.encoders.hf_tokenizer")  # TextStream: incremental decoding
    model = mmfm.load(models["plain"])
    code, out, _ = run(capsys, "generate-text", "--model", models["plain"], "a cat", "--max-new-tokens", "8")
    assert code == 0 and out == model.generate_text("a cat", max_new_tokens=8) + "\n"


def test_ctrl_c_during_a_stream_ends_the_line_with_exit_code_130(capsys, models, spy):
    spy(replies=[["Hel", "lo"]], interrupt_at=0)
    code, out, _ = run(capsys, "generate-text", "--model", models["plain"], "a")
    assert code == 130 and out == "Hel\n"


# ---- --chat ----


def test_chat_keeps_the_conversation_and_reset_empties_it(capsys, models, spy, monkeypatch):
    fake = spy(replies=[["Hi", " there"], ["Fine."], ["Hello again."]])
    with_stdin(monkeypatch, "hello\n\nhow are you?\n/reset\nhello\n")
    code, out, err = run(capsys, "generate-text", "--model", models["chat"], "--chat", "--system", "Be kind.")
    assert code == 0, err
    assert out == "Hi there\nFine.\nHello again.\n"  # the replies alone: no prompt or note on stdout
    system = {"role": "system", "content": "Be kind."}
    user, assistant = ({"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi there"})
    assert [c["messages"] for c in fake.calls] == [
        [system, user],
        [system, user, assistant, {"role": "user", "content": "how are you?"}],
        [system, user],  # after /reset: only the system message stays
    ]
    assert all(c["stream"] is True for c in fake.calls)


def test_chat_ends_at_end_of_input_with_exit_code_0_and_prints_nothing(capsys, models, spy, monkeypatch):
    fake = spy()
    with_stdin(monkeypatch, "")
    assert run(capsys, "generate-text", "--model", models["chat"], "--chat") == (0, "", "")
    assert fake.calls == []


def test_chat_help_lists_the_commands_on_stderr_and_exit_ends_the_session(capsys, models, spy, monkeypatch):
    fake = spy()
    with_stdin(monkeypatch, "/help\n/nonsense\n/exit\nnever read\n")
    code, out, err = run(capsys, "generate-text", "--model", models["chat"], "--chat")
    assert code == 0 and out == "" and fake.calls == []
    assert all(name in err for name in ("/reset", "/help", "/exit", "Ctrl-C"))
    assert "unknown command '/nonsense'" in err


def test_chat_no_stream_prints_whole_replies(capsys, models, spy, monkeypatch):
    fake = spy(replies=[["one"], ["two"]])
    with_stdin(monkeypatch, "a\nb\n")
    code, out, _ = run(capsys, "generate-text", "--model", models["chat"], "--chat", "--no-stream", "--seed", "1")
    assert code == 0 and out == "one\ntwo\n"
    assert [c["stream"] for c in fake.calls] == [False, False] and fake.calls[1]["seed"] == 1


def test_ctrl_c_during_a_reply_stops_it_and_the_conversation_goes_on(capsys, models, spy, monkeypatch):
    fake = spy(replies=[["Once", " upon", " a time"], ["ok"]], interrupt_at=0)
    with_stdin(monkeypatch, "tell a story\nthanks\n")
    code, out, err = run(capsys, "generate-text", "--model", models["chat"], "--chat")
    assert code == 0
    assert out == "Once\nok\n" and "(reply stopped)" in err
    assert fake.calls[1]["messages"] == [
        {"role": "user", "content": "tell a story"},
        {"role": "assistant", "content": "Once"},  # what was shown stays in the conversation
        {"role": "user", "content": "thanks"},
    ]


class InterruptingStdin(io.StringIO):
    """Lines of input where a line "^C" stands for Ctrl-C pressed at the prompt."""

    def readline(self, *args):
        line = super().readline(*args)
        if line == "^C\n":
            raise KeyboardInterrupt
        return line


@pytest.mark.parametrize(
    ("lines", "code", "replies"),
    [("^C\nhi\n", 0, 1), ("^C\n^C\nhi\n", 130, 0), ("^C\nhi\n^C\n^C\n", 130, 1)],
    ids=["once, then a turn", "twice in a row", "twice after a turn"],
)
def test_ctrl_c_at_the_prompt_twice_in_a_row_ends_the_session(capsys, models, spy, monkeypatch, lines, code, replies):
    fake = spy()
    with_stdin(monkeypatch, InterruptingStdin(lines))
    assert run(capsys, "generate-text", "--model", models["chat"], "--chat")[0] == code
    assert len(fake.calls) == replies


def test_a_failed_turn_of_piped_input_is_one_error_line_with_exit_code_2(capsys, models, monkeypatch):
    def fail(*args, **kwargs):
        raise InputError("prompt 0 has 99 tokens; too many")

    monkeypatch.setattr(mmfm.text_pipeline, "generate_text", fail)
    with_stdin(monkeypatch, "hello\n")
    code, out, err = run(capsys, "generate-text", "--model", models["chat"], "--chat")
    assert code == 2 and out == ""
    assert err == "mmfm: error: prompt 0 has 99 tokens; too many\n"


class TerminalStdin(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_at_a_terminal_a_failed_turn_is_reported_and_the_session_goes_on(capsys, models, monkeypatch):
    answers = iter([InputError("prompt 0 has 99 tokens; too many"), "fine"])

    def answer(*args, **kwargs):
        result = next(answers)
        if isinstance(result, Exception):
            raise result
        return iter([result])

    monkeypatch.setattr(mmfm.text_pipeline, "generate_text", answer)
    with_stdin(monkeypatch, TerminalStdin("a very long message\nshort\n"))
    code, out, err = run(capsys, "generate-text", "--model", models["chat"], "--chat")
    assert code == 0 and out == "fine\n"
    assert "mmfm: error: prompt 0 has 99 tokens; too many (/reset starts a new conversation)" in err
    assert err.count("> ") == 3  # a prompt before each line and before the end of input


def test_chat_talks_to_the_real_model(capsys, models, monkeypatch):
    """Two turns through the real pipeline: the second is answered in the context of the first."""
    pytest.importorskip("mmfm.chat_template")
    pytest.importorskip("mmfm.encoders.hf_tokenizer")
    real = mmfm.text_pipeline.generate_text
    seen = []

    def recording(model, prompts=None, *, messages=None, **kwargs):
        seen.append(copy.deepcopy(messages))
        return real(model, prompts, messages=messages, **kwargs)

    monkeypatch.setattr(mmfm.text_pipeline, "generate_text", recording)
    with_stdin(monkeypatch, "a cat\na dog\n")
    code, out, err = run(capsys, "generate-text", "--model", models["chat"], "--chat", "--max-new-tokens", "4")
    assert code == 0, err
    model = mmfm.load(models["chat"])
    first = model.generate_text(messages=[{"role": "user", "content": "a cat"}], max_new_tokens=4)
    assert seen[1] == [
        {"role": "user", "content": "a cat"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "a dog"},
    ]
    assert out == first + "\n" + model.generate_text(messages=seen[1], max_new_tokens=4) + "\n"


def test_chat_reads_piped_stdin_in_a_real_process(models, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mmfm", "generate-text", "--model", models["chat"], "--chat"],
        input="/help\n/reset\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and "/reset" in result.stderr and "> " not in result.stderr


# ---- export ----


def tiny_hf_llama(folder: Path) -> None:
    """A random 2-layer Llama and a small byte-level BPE tokenizer, saved by transformers into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the cat sat on the mat", "the capital of France is Paris"] * 5, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder)


def test_export_writes_a_folder_transformers_loads_with_the_same_logits(capsys, tmp_path):
    pytest.importorskip("mmfm.encoders.hf_tokenizer")
    transformers = pytest.importorskip("transformers")
    hf, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    tiny_hf_llama(hf)
    mmfm.load(hf).save_pretrained(ckpt)  # an mmfm checkpoint with an "hf" tokenizer
    code, stdout, err = run(capsys, "export", str(ckpt), str(out), "--to", "hf_llama")
    assert code == 0, err
    assert stdout == "" and f"mmfm: wrote {out}" in err
    original = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[0, 5, 17, 42, 3, 99, 250, 7], [1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)
    text = "the cat sat on the mat, Paris!"
    ids_out = transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"]
    assert ids_out == transformers.AutoTokenizer.from_pretrained(hf)(text)["input_ids"]


def test_export_overwrite_writes_into_a_folder_that_holds_files(capsys, tmp_path):
    pytest.importorskip("mmfm.encoders.hf_tokenizer")
    pytest.importorskip("transformers")
    hf, out = tmp_path / "hf", tmp_path / "out"
    tiny_hf_llama(hf)
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert run(capsys, "export", str(hf), str(out), "--to", "hf_llama")[0] == 2
    code, _, err = run(capsys, "export", str(hf), str(out), "--to", "hf_llama", "--overwrite")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "keep me" and (out / "model.safetensors").is_file()


# ---- help ----


@pytest.mark.parametrize("command", ["generate-text", "export", "convert"])
def test_help_of_the_text_commands_shows_examples_without_importing_torch(command, tmp_path):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mmfm", command, "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0
    assert "examples:" in result.stdout and f"  mmfm {command} " in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert not {"torch", "numpy", "transformers"} & imported


def test_the_command_list_and_convert_help_name_the_new_commands_and_sources(capsys):
    from mmfm.convert import list_sources

    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert "generate-text" in listing and "export" in listing
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(source in text for source in list_sources())


# ---- convert --dtype ----


def test_convert_dtype_reaches_a_converter_that_takes_one_and_the_saved_weights(capsys, tmp_path, monkeypatch):
    import mmfm.convert
    from mmfm.checkpoint import unique_state_dict
    from mmfm.convert import Converted

    model = mmfm.create_model("mmfm-test", **TEXT_ONLY)
    state = unique_state_dict(model)
    asked = []

    def converter(path, dtype=None):  # as a GGUF converter dequantizes: straight to the dtype asked for
        asked.append(dtype)
        return Converted(model.config, {k: v.to(dtype) for k, v in state.items()})

    mmfm.convert.list_sources()  # the built-in converters first, so the fake one is not replaced
    monkeypatch.setitem(mmfm.convert._CONVERTERS, "fake", converter)
    src, out = tmp_path / "weights.bin", tmp_path / "out"
    src.write_bytes(b"")
    code, _, err = run(capsys, "convert", str(src), str(out), "--from", "fake", "--dtype", "bfloat16")
    assert code == 0, err
    assert asked == [torch.bfloat16]
    from safetensors.torch import load_file

    saved = load_file(out / "model.safetensors")
    assert saved.keys() == state.keys() and {v.dtype for v in saved.values()} == {torch.bfloat16}
    assert all(torch.equal(saved[k], v.to(torch.bfloat16)) for k, v in state.items())
