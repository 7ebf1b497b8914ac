"""JSONL manifests and image folders: paths resolve, every bad line is caught with file:line, skip mode drops it."""

from __future__ import annotations

import json
import re
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
