"""Careless and hostile command lines: each ends as one `mmfm: error: ...` line with exit code 2, naming the argument
and what was wrong, before any slow work where it can be (never a traceback, never a hang, never lost results)."""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mmfm
from mmfm import cli
from mmfm.cli import main
from mmfm.errors import CheckpointError, InputError

NO_MODEL = "mmfm-nonexistent"  # an option checked before the model loads fails before this name is looked up


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli_bad")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "a.png")
    mmfm.create_model("mmfm-test").save_pretrained(root / "ckpt")
    return {"root": str(root), "png": str(root / "a.png"), "ckpt": str(root / "ckpt")}


def error_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Runs the CLI, checks it failed with exit code 2 and one error line on stderr, and returns that line."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if not line.startswith("mmfm: warning:")]
    assert code == 2, err
    assert out == ""
    assert len(lines) == 1 and lines[0].startswith("mmfm: error: "), err
    lines[0].encode("utf-8")  # printable whatever the arguments held
    return lines[0]


# ---- text that is not UTF-8 ----


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["embed", "--model", NO_MODEL, "--text", "a\udcffb"], "--text"),
        (["caption", "--model", NO_MODEL, "{png}", "--prompt", "\udcfe"], "--prompt"),
        (["classify", "--model", NO_MODEL, "{png}", "--labels", "cat,d\udcf0g"], "--labels"),
        (["train", "recipe.yaml", "optim.lr=\udcff"], "override"),
        (["generate-text", "--model", NO_MODEL, "a\udcfeb"], "PROMPT"),
        (["generate-text", "--model", NO_MODEL, "--chat", "--system", "\udcf0"], "--system"),
        (["generate-text", "--model", NO_MODEL, "a", "--stop", "x\udcff"], "--stop"),
    ],
    ids=["text", "prompt", "labels", "override", "generate-text PROMPT", "system", "stop"],
)
def test_a_non_utf8_text_argument_is_one_error_line_naming_the_option(capsys, files, argv, option):
    line = error_line(capsys, *[a.format(png=files["png"]) for a in argv])
    assert f"mmfm: error: {option} " in line and "is not valid UTF-8 text" in line
    assert "\\xff" in line or "\\xfe" in line or "\\xf0" in line


def test_a_non_utf8_file_name_is_captioned_and_printed_as_valid_utf8(capsysbinary, files, tmp_path):
    name = os.fsdecode(str(tmp_path).encode() + b"/\xff.png")
    Image.open(files["png"]).save(name)
    assert main(["caption", "--model", files["ckpt"], name]) == 0
    out = capsysbinary.readouterr().out.decode("utf-8")  # strict: no raw \xff byte
    assert out.startswith(f"{tmp_path}/\\xff.png\t")
    assert main(["caption", "--model", files["ckpt"], name, "--json"]) == 0
    record = json.loads(capsysbinary.readouterr().out.decode("utf-8"))
    assert record["input"] == f"{tmp_path}/\\xff.png"


# ---- zero-shot labels ----


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ("a,a,b", "--labels: label 2 repeats 'a' of label 1; each label must appear once"),
        ("cat, dog,cat ", "--labels: label 3 repeats 'cat' of label 1"),
        ("a,,b", "--labels: label 2 is empty"),
        ("a,b,", "--labels: label 3 is empty"),
    ],
)
def test_repeated_or_empty_labels_are_refused_before_the_model_loads(capsys, files, labels, message):
    line = error_line(capsys, "classify", "--model", NO_MODEL, files["png"], "--labels", labels)
    assert line == f"mmfm: error: {message}" or line.startswith(f"mmfm: error: {message}")


@pytest.mark.parametrize("case", ["binary", "not utf-8", "folder", "fifo", "device", "too big", "repeated"])
def test_a_labels_file_that_is_not_one_text_label_per_line_is_one_error_line(
    capsys, files, tmp_path, case, monkeypatch
):
    path = tmp_path / "labels.txt"
    expected = {
        "binary": "is binary (a NUL byte at character 4)",
        "not utf-8": "is not UTF-8 text (byte 0xff at offset 4)",
        "folder": "labels.txt: ",
        "fifo": "is not a regular file",
        "device": "is not a regular file",
        "too big": "is over",
        "repeated": "line 4 repeats 'cat' of line 1",
    }[case]
    writer = None
    if case == "binary":
        path.write_bytes(b"cat\n\x00\x01\x02")
    elif case == "not utf-8":
        path.write_bytes(b"cat\n\xff\xfe")
    elif case == "folder":
        path.mkdir()
    elif case == "fifo":
        os.mkfifo(path)
        # A writer that opens and closes at once, so that code reading the FIFO sees EOF instead of hanging.
        writer = threading.Thread(target=lambda: os.close(os.open(path, os.O_WRONLY)), daemon=True)
        writer.start()
    elif case == "device":
        path = Path(os.devnull)
    elif case == "too big":
        monkeypatch.setattr(cli, "MAX_LABELS_FILE_BYTES", 64)
        path.write_text("\n".join(f"label{i}" for i in range(20)))
    else:
        path.write_text("cat\n\ndog\n cat\n")
    try:
        line = error_line(capsys, "classify", "--model", NO_MODEL, files["png"], "--labels-file", str(path))
    finally:
        if writer is not None and writer.is_alive():
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # release the writer
    assert line.startswith(f"mmfm: error: --labels-file {path}: ") and expected in line


# ---- numbers: seeds and temperatures ----


@pytest.mark.parametrize(
    "argv",
    [
        ["caption", "--model", NO_MODEL, "{png}", "--do-sample", "--seed", "99999999999999999999999999"],
        ["caption", "--model", NO_MODEL, "{png}", "--do-sample", "--seed", "-9999999999999999999999"],
        ["generate-image", "--model", NO_MODEL, "--text", "a", "--out", "{root}/x.png", "--seed", str(2**64)],
    ],
    ids=["caption", "caption negative", "generate-image"],
)
def test_a_seed_beyond_64_bits_is_one_error_line_before_the_model_loads(capsys, files, argv):
    line = error_line(capsys, *[a.format(**files) for a in argv])
    assert line.startswith("mmfm: error: --seed must be a whole number in [-2**63, 2**64 - 1]")


def test_a_negative_dataset_seed_is_one_error_line(capsys, tmp_path):
    line = error_line(capsys, "data", "digits", str(tmp_path / "digits"), "--seed", "-1")
    assert line == "mmfm: error: --seed must be a whole number in [0, 2**64 - 1], got -1"
    assert not (tmp_path / "digits").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_a_non_finite_temperature_is_one_error_line_before_the_model_loads(capsys, files, value):
    line = error_line(capsys, "caption", "--model", NO_MODEL, files["png"], "--do-sample", f"--temperature={value}")
    assert line.startswith("mmfm: error: temperature must be a finite number")


# ---- --out ----


@pytest.mark.parametrize(
    ("argv", "what"),
    [
        (["embed", "--model", NO_MODEL, "--text", "a", "--out", "{out}"], "embeddings"),
        (["generate-image", "--model", NO_MODEL, "--text", "a", "--out", "{out}"], "image"),
        (["eval", "--model", NO_MODEL, "--data", "val.jsonl", "--out", "{out}"], "metrics"),
    ],
    ids=["embed", "generate-image", "eval"],
)
@pytest.mark.parametrize("problem", ["missing folder", "a folder", "a file as folder"])
def test_an_out_that_cannot_be_written_fails_before_any_work(capsys, tmp_path, argv, what, problem):
    suffix = {"embeddings": ".npy", "image": ".png", "metrics": ".json"}[what]
    if problem == "missing folder":
        if what == "metrics":
            pytest.skip("mmfm eval creates the folder of --out (see the next test)")
        out, reason = tmp_path / "missing" / f"x{suffix}", f"(the folder {tmp_path / 'missing'} does not exist)"
    elif problem == "a folder":
        out, reason = tmp_path / f"x{suffix}", "(it is a folder; name a file)"
        out.mkdir()
    else:
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / f"x{suffix}"
        reason = f"({tmp_path / 'file'} is a file, not a folder)"
        reason = reason if what == "metrics" else f"(the folder {tmp_path / 'file'} does not exist)"
    line = error_line(capsys, *[a.format(out=out) for a in argv])
    assert line == f"mmfm: error: --out {out}: cannot write the {what} {reason}"


def test_eval_out_creates_its_folder_and_writes_the_printed_metrics(capsys, files, tiny_digits, tmp_path):
    out = tmp_path / "new" / "deeper" / "metrics.json"
    data = str(tiny_digits / "val.jsonl")
    assert main(["eval", "--model", files["ckpt"], "--data", data, "--metrics", "loss,top1", "--out", str(out)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()  # "task  metric  value", then one row per number
    assert header.split() == ["task", "metric", "value"]
    printed, task = {}, None
    for row in rows:  # a task's name is on its first row only
        *named, metric, value = row.split()
        task = named[0] if named else task
        printed[f"val/{task}/{metric}"] = value
    written = json.loads(out.read_text())["metrics"]
    assert printed and {k: f"{v:.4f}" for k, v in written.items()} == printed
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temporary file left beside it


# ---- paths the system refuses, bombs, multi-line messages ----


@pytest.mark.parametrize("where", ["file", "model", "labels-file"])
def test_an_over_long_path_is_one_shortened_error_line(capsys, files, where):
    long = "x" * 5000
    argv = {
        "file": ["caption", "--model", files["ckpt"], f"{long}.png"],
        "model": ["caption", "--model", f"{long}/ckpt", files["png"]],
        "labels-file": ["classify", "--model", files["ckpt"], files["png"], "--labels-file", long],
    }[where]
    line = error_line(capsys, *argv)
    assert len(line) < 600 and "characters)..." in line


def _png_header_only(width: int, height: int) -> bytes:
    """A ~60-byte PNG that declares width x height pixels: what a decompression bomb looks like before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_is_one_error_line_naming_the_file(capsys, files, tmp_path):
    """Needs the image processor's pixel limit (issue 11's processor work): PIL's bomb error as an InputError."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(20_000, 20_000))
    line = error_line(capsys, "caption", "--model", files["ckpt"], str(bomb))
    assert str(bomb) in line


def test_an_error_message_of_several_lines_is_printed_as_one(capsys, files, monkeypatch):
    import mmfm.pipelines

    def fail(*args, **kwargs):
        raise InputError("image 0 ('a.png'): too large\nsee the README's 'Bad input'")

    monkeypatch.setattr(mmfm.pipelines, "caption", fail)
    line = error_line(capsys, "caption", "--model", files["ckpt"], files["png"])
    assert line == "mmfm: error: image 0 ('a.png'): too large see the README's 'Bad input'"


# ---- convert ----


@pytest.mark.parametrize("overwrite", [False, True])
def test_convert_asks_the_loader_whether_the_output_is_safe_before_reading_anything(
    capsys, tmp_path, monkeypatch, overwrite
):
    import mmfm.convert
    import mmfm.loader

    calls = []

    def check(src, out, overwrite=False):
        calls.append((src, out, overwrite))
        raise CheckpointError(f"{out}: the output is the input {src} or lies inside it")

    def never(*args, **kwargs):
        raise AssertionError("convert ran before the output was checked")

    monkeypatch.setattr(mmfm.loader, "check_convert_output", check)
    monkeypatch.setattr(mmfm.convert, "convert", never)
    src = str(tmp_path / "weights")
    argv = ["convert", src, src, "--from", "timm"] + ["--overwrite"] * overwrite
    line = error_line(capsys, *argv)
    assert calls == [(src, src, overwrite)]
    assert line == f"mmfm: error: {src}: the output is the input {src} or lies inside it"


def test_convert_refuses_an_unknown_dtype_before_reading_anything(capsys, tmp_path):
    line = error_line(
        capsys, "convert", str(tmp_path / "absent"), str(tmp_path / "out"), "--from", "ast", "--dtype", "int8"
    )
    assert line == "mmfm: error: unknown dtype 'int8' (known: float32, bfloat16, float16)"
    assert not (tmp_path / "out").exists()


# ---- generate-text ----


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "generate-text needs a PROMPT (or several), or --chat for a conversation"),
        (["a", "--do-sample", "--temperature", "nan"], "temperature must be a finite number, got nan"),
        (["a", "--temperature=-inf"], "temperature must be a finite number, got -inf"),
        (["a", "--max-new-tokens", "0"], "max_new_tokens must be a whole number >= 1, got 0"),
        (["a", "--stop", ""], "stop must be a non-empty string or a list of them"),
        (["a", "--top-p", "1.5"], "top_p must be"),
        (["a", "--repetition-penalty", "0"], "repetition_penalty must be"),
        (["a", "--do-sample", "--seed", str(2**64)], "--seed must be a whole number in [-2**63, 2**64 - 1]"),
        (["a", "--num-beams", "2", "--do-sample"], "beam search (num_beams > 1) does not sample"),
        (["a", "--system", "Be brief."], "--system is a chat message: add --as-chat"),
        (["a", "b", "--stream"], "--stream prints one PROMPT's text as it is decoded, got 2 PROMPTs"),
        (["a", "--stream", "--json"], "--stream prints text as it comes and --json whole records; choose one"),
        (["a", "--stream", "--num-beams", "3"], "--stream decodes token by token; beam search"),
        (["a", "--chat"], "--chat reads the conversation from stdin, one user turn per line; give no PROMPT"),
        (["--chat", "--json"], "--chat prints each reply as text; --json is for PROMPT arguments"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_generate_text_arguments_are_one_error_line_before_the_model_loads(capsys, argv, message):
    line = error_line(capsys, "generate-text", "--model", NO_MODEL, *argv)
    assert line.startswith(f"mmfm: error: {message}"), line


@pytest.mark.parametrize("flag", ["--as-chat", "--chat"])
def test_a_conversation_with_a_model_without_a_chat_template_is_one_error_line(capsys, files, flag):
    argv = ["generate-text", "--model", files["ckpt"], flag] + (["hello"] if flag == "--as-chat" else [])
    line = error_line(capsys, *argv)
    assert line.startswith(f"mmfm: error: {flag}: the model {files['ckpt']} has no chat template (text.chat_template)")


# ---- export ----


def test_export_names_an_unknown_format_before_loading(capsys, tmp_path):
    line = error_line(capsys, "export", NO_MODEL, str(tmp_path / "out"), "--to", "onnx")
    assert line == "mmfm: error: --to onnx: unknown format (known: hf_llama)"


def test_export_of_a_model_without_an_hf_tokenizer_is_one_error_line_and_writes_nothing(capsys, files, tmp_path):
    out = tmp_path / "out"
    line = error_line(capsys, "export", files["ckpt"], str(out), "--to", "hf_llama")
    assert (
        line == "mmfm: error: exporting to hf_llama needs an 'hf' tokenizer (a tokenizer.json); this model's is 'byte'"
    )
    assert not out.exists()


@pytest.mark.parametrize("case", ["holds files", "holds files, --overwrite", "is SRC", "holds SRC", "is a file"])
def test_export_refuses_an_output_that_could_lose_files_before_loading(capsys, files, tmp_path, case):
    src, out = Path(files["ckpt"]), tmp_path / "out"
    expected = {
        "holds files": "the output folder holds files (notes.txt); exporting replaces files of the names it writes",
        "is SRC": f"the output folder is the input {src} or holds it",
        "holds SRC": "the output folder is the input",
        "is a file": "the output must be a folder, and this is a file",
    }
    if case.startswith("holds files"):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "is SRC":
        out = src
    elif case == "holds SRC":
        out = src.parent
    else:
        out.write_text("")
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    overwrite = ["--overwrite"] if case.endswith("--overwrite") else []
    line = error_line(capsys, "export", str(src), str(out), "--to", "hf_llama", *overwrite)
    if overwrite:  # the output is accepted: the model's tokenizer is what fails
        assert "needs an 'hf' tokenizer" in line
    else:
        assert line.startswith(f"mmfm: error: {out}: {expected[case]}"), line
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before
