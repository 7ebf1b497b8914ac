"""JSONL manifests and image folders: paths resolve, every bad line is caught with file:line, skip mode drops it."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from mmfm.data import ImageFolderDataset, ManifestDataset
from mmfm.errors import InputError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A directory with imgs/a.png, imgs/b.png and clips/a.wav."""
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "clips").mkdir()
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{name}.png")
    soundfile.write(tmp_path / "clips" / "a.wav", 0.1 * rng.standard_normal(4000), 16000)
    return tmp_path


def write_manifest(path: Path, lines: list[object]) -> Path:
    """Writes lines (dicts as JSON, strings verbatim) as a manifest."""
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


GOOD = [
    {"image": "imgs/a.png", "audio": "clips/a.wav", "caption": ["first", "second", "third"], "label": "cat"},
    {"text": "just some text"},
    {"image": "imgs/b.png", "caption": "only one", "label": 7, "id": "b"},
]


def test_paths_resolve_against_the_manifest_directory_not_the_working_directory(root, tmp_path, monkeypatch):
    manifest = write_manifest(root / "train.jsonl", [*GOOD, {"image": str(root / "imgs" / "b.png")}])
    monkeypatch.chdir(tmp_path.parent)
    ds = ManifestDataset(manifest)
    assert len(ds) == 4
    assert ds[0]["image"] == str((root / "imgs" / "a.png").resolve())
    assert ds[0]["audio"] == str((root / "clips" / "a.wav").resolve())
    assert ds[3]["image"] == str((root / "imgs" / "b.png").resolve())  # absolute stays absolute
    assert ds[1] == {"index": 1, "text": "just some text"}
    assert ds[2]["label"] == "7"  # an int label becomes its str
    assert ds[2]["id"] == "b"
    assert ds.labels() == ["7", "cat"]


def test_a_draw_picks_one_reference_caption_and_a_plain_index_the_first(root):
    ds = ManifestDataset(write_manifest(root / "m.jsonl", GOOD))
    assert ds[0]["caption"] == "first"
    assert [ds[(0, draw)]["caption"] for draw in range(5)] == ["first", "second", "third", "first", "second"]
    assert ds[(0, 4)]["captions"] == ["first", "second", "third"]
    assert ds[(2, 5)]["caption"] == "only one" and ds[2]["captions"] == ["only one"]
    assert ds[-1]["index"] == 2
    with pytest.raises(IndexError):
        ds[3]


def test_audio_captions_are_read_and_drawn_like_captions(root):
    lines = [
        {"audio": "clips/a.wav", "caption": ["a cat", "the cat"], "audio_caption": ["a meow", "a purr", "a hiss"]},
        {"audio": "clips/a.wav", "audio_caption": "only a meow", "label": "cat"},
        GOOD[2],
    ]
    ds = ManifestDataset(write_manifest(root / "m.jsonl", lines))
    assert ds[0]["audio_caption"] == "a meow" and ds[0]["audio_captions"] == ["a meow", "a purr", "a hiss"]
    assert ds[(0, 2)]["audio_caption"] == "a hiss" and ds[(0, 2)]["caption"] == "a cat"  # one draw picks both
    assert ds[1]["audio_caption"] == "only a meow" and ds[1]["audio_captions"] == ["only a meow"]
    assert "caption" not in ds[1] and "audio_caption" not in ds[2] and "audio_captions" not in ds[2]


BAD = [
    ("{not json", "invalid JSON"),
    ('["a", "list"]', "expected a JSON object, got an array"),
    ({"image": "imgs/a.png", "captions": ["typo"]}, "unknown key 'captions'"),
    ({"image": 3}, "image must be a non-empty path string, got the number 3"),
    ({"text": ["not", "a", "string"]}, "text must be a string, got an array"),
    ({"image": "imgs/a.png", "caption": []}, "caption is an empty list"),
    ({"image": "imgs/a.png", "caption": ["ok", 5]}, "caption[1] must be a string"),
    ({"image": "imgs/a.png", "label": True}, "label must be a string or an int, got a boolean"),
    ({"image": "imgs/missing.png"}, "image 'imgs/missing.png' not found"),
    ({"audio": "clips/missing.wav"}, "audio 'clips/missing.wav' not found"),
    ({"image": "imgs"}, "image 'imgs' is not a file"),
    ({"label": "cat"}, "has no image, audio, text or caption"),
    # what the collator's tokenizer would trip on mid-training is caught here, with file:line
    ({"image": "imgs/a.png", "caption": "\ud800"}, "caption holds a lone surrogate U+D800 at character 0"),
    ({"image": "imgs/a.png", "caption": ["ok", "a\udfffb"]}, "caption[1] holds a lone surrogate U+DFFF at character 1"),
    ({"text": "x\udc00"}, "text holds a lone surrogate U+DC00"),
    ({"audio": "clips/a.wav", "audio_caption": []}, "audio_caption is an empty list"),
    ({"audio_caption": {}}, "audio_caption must be a string or a list of strings, got an object"),
    ({"audio": "clips/a.wav", "audio_caption": ["ok", None]}, "audio_caption[1] must be a string, got null"),
    ({"audio": "clips/a.wav", "audio_caption": ""}, "audio_caption is an empty string"),
    ({"audio": "clips/a.wav", "audio_caption": "\udc00"}, "audio_caption holds a lone surrogate U+DC00"),
    ({"image": "imgs/a.png", "label": "\ud83d"}, "label holds a lone surrogate U+D83D"),
    ({"image": "imgs/a.png", "id": "\ud800"}, "id holds a lone surrogate"),
    ({"image": "imgs/\ud800.png"}, "image holds a lone surrogate"),
    ({"image": "x" * 5000}, "x...(4920 characters)..." + "x" * 40 + "' is not a usable path (File name too long)"),
    ({"image": "/dev/null"}, "image '/dev/null' is not a file"),
    ("[" * 100_000, "nested too deeply"),
    ('{"caption": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested too deeply"),
]


@pytest.mark.parametrize("line,problem", BAD, ids=[problem for _, problem in BAD])
def test_each_bad_line_raises_naming_file_line_and_problem(root, line, problem):
    manifest = write_manifest(root / "train.jsonl", [GOOD[0], "", GOOD[1], line, GOOD[2]])
    with pytest.raises(InputError) as info:
        ManifestDataset(manifest)
    message = str(info.value)
    assert message.startswith(f"{manifest}:4: "), message  # the blank line 2 still counts as a line
    assert problem in message


def test_skip_mode_drops_exactly_the_bad_lines_and_reports_them_once(root):
    bad = [line for line, _ in BAD]
    lines = [GOOD[0], bad[0], GOOD[1], "", bad[8], GOOD[2], *bad[2:5], bad[9]]
    manifest = write_manifest(root / "train.jsonl", lines)
    with pytest.warns(UserWarning) as caught:
        ds = ManifestDataset(manifest, on_error="skip")
    assert len(caught) == 1
    assert [ln for ln, _ in ds.skipped] == [2, 5, 7, 8, 9, 10]
    assert "image 'imgs/missing.png' not found" in dict(ds.skipped)[5]
    message = str(caught[0].message)
    assert "skipped 6 bad lines" in message
    assert re.findall(r"line (\d+):", message) == ["2", "5", "7", "8", "9"]  # the first five, then a count
    assert "and 1 more" in message
    assert [ds[i].get("caption") for i in range(len(ds))] == ["first", None, "only one"]


def test_blank_lines_are_ignored_and_a_manifest_without_examples_is_an_error(root):
    ds = ManifestDataset(write_manifest(root / "m.jsonl", ["", GOOD[1], "   ", ""]))
    assert len(ds) == 1
    with pytest.raises(InputError, match="no usable examples"):
        ManifestDataset(write_manifest(root / "empty.jsonl", ["", ""]))
    with pytest.warns(UserWarning), pytest.raises(InputError, match="all 2 lines were skipped"):
        ManifestDataset(write_manifest(root / "bad.jsonl", ["{", "[]"]), on_error="skip")
    with pytest.raises(InputError, match="manifest not found"):
        ManifestDataset(root / "nope.jsonl")


def test_image_folder_gives_sorted_classes_and_skips_non_images(tmp_path):
    image = Image.new("RGB", (4, 4))
    for cls, names in {"dog": ["b.png", "a.jpg"], "cat": ["x.png"], "empty": []}.items():
        (tmp_path / cls).mkdir()
        for name in names:
            image.save(tmp_path / cls / name)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ds.labels() == ["cat", "dog"]
    assert [(Path(ds[i]["image"]).name, ds[i]["label"]) for i in range(len(ds))] == [
        ("x.png", "cat"),
        ("a.jpg", "dog"),
        ("b.png", "dog"),
    ]
    with pytest.raises(InputError, match="no images found"):
        ImageFolderDataset(tmp_path / "empty")


def test_line_separators_inside_json_strings_are_not_line_breaks(root):
    # json.dumps(ensure_ascii=False) writes U+2028, U+2029, U+0085 (and U+001C..U+001E escaped) as they are:
    # valid JSON, and only "\n" separates JSON lines.
    captions = ["two\u2028lines", "next\u0085line", "para\u2029graph", "form\x0cfeed"]
    lines = [{"image": "imgs/a.png", "caption": c} for c in captions] + [{"text": "last\u2028one", "id": "\u2028"}]
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    assert len(manifest.read_text(encoding="utf-8").splitlines()) > len(lines)  # what str.splitlines would do
    for on_error in ("raise", "skip"):
        ds = ManifestDataset(manifest, on_error=on_error)
        assert ds.skipped == []
        assert [ds[i].get("caption") for i in range(4)] == captions
        assert ds[4]["text"] == "last\u2028one" and ds[4]["id"] == "\u2028"


def test_windows_line_ends_still_work(root):
    manifest = root / "m.jsonl"
    manifest.write_bytes(b"".join(json.dumps(x).encode() + b"\r\n" for x in GOOD) + b"\r\n")
    assert [ManifestDataset(manifest)[i].get("label") for i in range(3)] == ["cat", None, "7"]


def test_a_deeply_nested_line_is_one_bad_line_even_when_skipping(root):
    nested = '{"caption": ' + "[" * 200_000 + "]" * 200_000 + "}"
    manifest = write_manifest(root / "m.jsonl", [GOOD[0], nested, GOOD[1], "[" * 200_000])
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="skipped 2 bad lines"):
        ds = ManifestDataset(manifest, on_error="skip")
    assert [line for line, _ in ds.skipped] == [2, 4] and len(ds) == 2
    assert all("nested too deeply" in reason for _, reason in ds.skipped)
    with pytest.raises(InputError, match=rf"^{re.escape(str(manifest))}:2: invalid JSON: .*nested too deeply"):
        ManifestDataset(manifest)
    assert time.perf_counter() - start < 5


def test_a_lone_surrogate_is_refused_before_the_collator_sees_it(root):
    manifest = root / "m.jsonl"
    manifest.write_text(
        '{"image": "imgs/a.png", "caption": "fine"}\n{"image": "imgs/b.png", "caption": "bad \\ud800"}\n'
    )
    with pytest.raises(InputError, match=rf"^{re.escape(str(manifest))}:2: caption holds a lone surrogate U\+D800"):
        ManifestDataset(manifest)
    with pytest.warns(UserWarning, match="line 2: caption holds a lone surrogate"):
        ds = ManifestDataset(manifest, on_error="skip")
    assert len(ds) == 1


def test_a_manifest_that_is_not_a_regular_file_is_refused_without_reading_it(root):
    with pytest.raises(InputError, match=rf"{re.escape(str(root))}: the manifest is not a regular file"):
        ManifestDataset(root)
    fifo = root / "pipe.jsonl"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def build() -> None:
        try:
            ManifestDataset(fifo)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            outcome.append(e)

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():  # a blocked reader: give it a writer so the thread ends, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
        pytest.fail("reading a FIFO manifest waited for a writer")
    assert isinstance(outcome[0], InputError) and "not a regular file" in str(outcome[0])
    with pytest.raises(InputError, match="cannot read the manifest"):
        ManifestDataset("m" * 5000 + ".jsonl")
    (root / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(InputError, match="latin1.jsonl: cannot read the manifest .*utf-8"):
        ManifestDataset(root / "latin1.jsonl")
