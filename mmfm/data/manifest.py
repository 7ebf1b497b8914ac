"""Map-style datasets over files on disk: JSONL manifests, and class-per-folder image trees.

A manifest has one example per line, a JSON object with any of these keys:

```
{"image": "imgs/7.png", "audio": "clips/7.wav", "caption": ["a seven", "the digit 7"], "label": "7"}
{"audio": "clips/8.wav", "audio_caption": ["the keypad tone for 8", "a phone key tone, eight"], "label": "8"}
{"text": "a line of text for a text-only language-model objective"}
```

- `image`, `audio`: a path, relative to the manifest's directory (absolute paths are kept as they are).
- `text`: a str, trained as plain language modelling.
- `caption`: a str, or a non-empty list of reference captions (one is picked per sample, see `__getitem__`).
- `audio_caption`: the same, for references that describe the example's sound: a caption task whose inputs are
  `[audio]` trains on these where an example has them, and on its `caption` otherwise (a `caption` may describe what
  the image shows, which the sound does not).
- `label`: a class name; an int is accepted and becomes its str (`7` -> `"7"`).
- `id`: an optional str or int, passed through.

A conversation line (for chat training and evaluation, see `mmfm.chat_format`) holds `messages` instead:

```
{"messages": [{"role": "user", "content": "<image>\nWhich digit is this?"},
              {"role": "assistant", "content": "It is a seven."}],
 "images": ["img/7.png"], "audio": [], "family": "image_digit", "answer": "seven", "id": 12}
```

- `messages`: the turns (roles system, user, assistant); `<image>` and `<audio>` placeholders anywhere in them.
- `images`, `audio`: lists of paths, taken in order by the placeholders; each count must equal its placeholders'.
- `family`: an optional question family, for per-family metrics; `answer`: an optional word or phrase a correct
  reply must contain (else the last assistant turn is the reference); `id` as above.
- there must be an assistant turn; given a model's `ChatFormat`, the dataset also checks that each conversation
  fits (`mmfm.chat_format` says how a long one is cut) and keeps its encoding.

Lines are separated by "\n" only (U+2028 and U+0085 are valid inside JSON strings). Every line is checked when
the dataset is built - its JSON (nesting too deep to read is a bad line), its types, that its text is valid
Unicode (no lone surrogates) and that its media are files - so a bad line fails (or is skipped) before training
starts rather than hours into it.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

if TYPE_CHECKING:
    from mmfm.chat_format import ChatFormat

from mmfm.config import MEDIA, shorten
from mmfm.errors import InputError

IMAGE_EXTENSIONS = MEDIA["image"].extensions
AUDIO_EXTENSIONS = MEDIA["audio"].extensions
MANIFEST_KEYS = ("image", "audio", "text", "caption", "audio_caption", "label", "id")
# Manifest keys of reference captions -> the item key of all the references (the picked one keeps the manifest key).
CAPTION_KEYS = {"caption": "captions", "audio_caption": "audio_captions"}
CONVERSATION_KEYS = ("messages", "images", "audio", "family", "answer", "id")
# Media keys of a conversation line, by modality.
CONVERSATION_MEDIA = {"image": "images", "audio": "audio"}

# How many skipped lines the warning of on_error="skip" lists before "and N more".
_SKIPS_LISTED = 5

Key = int | tuple[int, int]


class ManifestDataset(Dataset):
    """The examples of a JSONL manifest, validated up front.

    Args:
        path: the manifest file; relative media paths in it are resolved against its directory.
        on_error: "raise" stops at the first bad line with an `InputError` naming `file:line`; "skip" drops bad
            lines, warns once with their count and the first few, and records them in `skipped`.
        chat_format: the model's `ChatFormat`: conversation lines are encoded up front (a placeholder of a modality
            the model lacks, or a conversation with no reply within the limit, is a bad line) and their items
            carry the encoding as `conversation`.

    Attributes:
        path: the manifest path as given.
        skipped: (line number, reason) of every dropped line, in file order; empty with on_error="raise".

    Raises:
        InputError: the manifest is missing or unreadable, a line is bad (with on_error="raise"), or no line
            holds a usable example.
    """

    def __init__(self, path: str | Path, on_error: str = "raise", chat_format: ChatFormat | None = None) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.path = Path(path)
        self.skipped: list[tuple[int, str]] = []
        lines = read_lines(self.path)
        root = self.path.parent
        self._records: list[dict[str, Any]] = []
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = parse_record(line, root)
                if chat_format is not None and "messages" in record:
                    record["conversation"] = chat_format.encode(record["messages"])
                self._records.append(record)
            except InputError as e:
                if on_error == "raise":
                    raise InputError(f"{self.path}:{line_no}: {e}") from None
                self.skipped.append((line_no, str(e)))
        if self.skipped:
            warnings.warn(f"{self.path}: {_describe_skips(self.skipped)}", stacklevel=2)
        if not self._records:
            why = f"; all {len(self.skipped)} lines were skipped" if self.skipped else " (it is empty)"
            raise InputError(f"{self.path}: the manifest has no usable examples{why}")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, key: Key) -> dict[str, Any]:
        """One example as a dict.

        Args:
            key: an index, or an `(index, draw)` pair as `EpochSampler` yields: an example with several reference
                captions trains on `captions[draw % len(captions)]` (the first one for a plain index); the same
                draw picks among its audio captions.

        Returns:
            `index`, plus whichever of these the example has: `image` and `audio` (absolute path str), `text`,
            `caption` (the chosen str), `captions` (all references), `audio_caption` and `audio_captions` (the
            same for the sound's references), `label` (str), `id`; a conversation's item has `messages`, `media`
            ({"image": [paths], "audio": [paths]}), `family`, `answer`, `id` and, when the dataset was given a
            chat format, `conversation` (its `EncodedConversation`).
        """
        index, draw = _split_key(key, len(self))
        return make_item(index, self._records[index], draw)

    def labels(self) -> list[str]:
        """The distinct labels of all examples, sorted."""
        return sorted({r["label"] for r in self._records if "label" in r})


class ImageFolderDataset(Dataset):
    """Images sorted into one folder per class: `root/<class>/**/<image file>`.

    Classes are the folder names that hold at least one image, sorted; files are found recursively and sorted,
    and only known image extensions count (hidden files and stray text files are ignored).

    Args:
        root: the directory holding the class folders.

    Attributes:
        classes: the class names, sorted.

    Raises:
        InputError: `root` is not a directory or holds no class folder with images in it.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: not a directory (expected root/<class>/<image files>)")
        self._items: list[tuple[Path, str]] = []
        classes = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(
                p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            )
            if files:
                classes.append(folder.name)
                self._items.extend((p.resolve(), folder.name) for p in files)
        if not self._items:
            raise InputError(
                f"{self.root}: no images found; expected one folder per class holding image files "
                f"({' '.join(IMAGE_EXTENSIONS)})"
            )
        self.classes = classes

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, key: Key) -> dict[str, Any]:
        """One example: `index`, `image` (absolute path str) and `label` (its folder's name).

        Args:
            key: an index, or an `(index, draw)` pair (the draw is unused: there are no captions).
        """
        index, _ = _split_key(key, len(self))
        path, label = self._items[index]
        return {"index": index, "image": str(path), "label": label}

    def labels(self) -> list[str]:
        """The class names, sorted."""
        return list(self.classes)


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 manifest file, split on "\\n" only.

    JSON Lines separates records by "\\n" alone: U+2028, U+2029, U+0085 and the other characters `str.splitlines`
    also breaks on are valid inside a JSON string (`json.dumps(..., ensure_ascii=False)` writes them as they are),
    so splitting on them would cut a good line in two. A "\\r" before the "\\n" (Windows line ends) is dropped.

    Raises:
        InputError: the file is missing, not a regular file (a folder, a device, a FIFO), unreadable or not UTF-8.
    """
    try:
        # Non-blocking, so that a FIFO is refused below instead of waiting for a writer; no effect on files.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InputError(f"{path}: manifest not found") from None
    except (OSError, ValueError) as e:  # a folder on some systems, no permission, a name too long, a NUL byte
        raise InputError(f"{path}: cannot read the manifest ({e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"{path}: the manifest is not a regular file (a folder, a device or a pipe?)")
    with os.fdopen(fd, "rb") as f:
        try:
            text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: cannot read the manifest ({e})") from None
    lines = text.split("\n")
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def parse_record(line: str, root: Path) -> dict[str, Any]:
    """Validates one manifest line; media paths become absolute and must exist, a caption becomes a list.

    Args:
        line: the JSON text of the line.
        root: the directory relative media paths are resolved against.

    Raises:
        InputError: the problem, without the line number (the caller adds `file:line`).
    """
    data = parse_json_object(line)
    if "messages" in data:
        return parse_conversation(data, root)
    unknown = [k for k in data if k not in MANIFEST_KEYS]
    if unknown:
        raise InputError(f"unknown key {unknown[0]!r} (known: {', '.join(MANIFEST_KEYS)})")
    record: dict[str, Any] = {}
    for key in ("image", "audio"):
        if key in data:
            record[key] = _media_path(data[key], key, root)
    record.update(parse_fields(data))
    if not any(k in record for k in ("image", "audio", "text", "caption")):
        raise InputError("the example has no image, audio, text or caption")
    return record


def parse_conversation(data: dict[str, Any], root: Path) -> dict[str, Any]:
    """Validates a conversation line (the module docstring): turns, media lists matching the placeholders, fields.

    Raises:
        InputError: the problem, without the line number (the caller adds `file:line`).
    """
    from mmfm.chat_format import check_media_counts, check_messages

    unknown = [k for k in data if k not in CONVERSATION_KEYS]
    if unknown:
        raise InputError(f"unknown key {unknown[0]!r} in a conversation (known: {', '.join(CONVERSATION_KEYS)})")
    messages = check_messages(data["messages"])
    for i, turn in enumerate(messages):
        _check_unicode(turn["content"], f"messages[{i}].content")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise InputError("the conversation has no assistant turn to learn from or to compare with")
    media: dict[str, list[str]] = {}
    for modality, key in CONVERSATION_MEDIA.items():
        paths = data.get(key, [])
        if not isinstance(paths, list):
            raise InputError(f"{key} must be a list of paths in a conversation, got {_json_type(paths)}")
        media[modality] = [_media_path(p, f"{key}[{i}]", root) for i, p in enumerate(paths)]
    check_media_counts(messages, {m: len(paths) for m, paths in media.items()}, "its messages")
    record: dict[str, Any] = {"messages": messages, "media": media}
    for key in ("family", "answer"):
        if key in data:
            record[key] = _nonempty_str(data[key], key)
    if "id" in data:
        record.update(parse_fields({"id": data["id"]}))
    return record


def _media_path(value: Any, key: str, root: Path) -> str:
    """The absolute path of a media file named in a manifest, which must exist."""
    if not isinstance(value, str) or not value:
        raise InputError(f"{key} must be a non-empty path string, got {_json_type(value)}")
    _check_unicode(value, key)
    path = root / value
    try:
        is_file, exists = path.is_file(), path.exists()
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte
        raise InputError(f"{key} {_shown(value)} is not a usable path ({_os_reason(e)})") from None
    if not is_file:
        raise InputError(f"{key} {_shown(value)} {'is not a file' if exists else 'not found'}")
    return str(path.resolve())


def parse_json_object(text: str | bytes) -> dict[str, Any]:
    """The JSON object one manifest line (or shard member) holds.

    Raises:
        InputError: the text is not JSON, is nested deeper than the parser's recursion limit, or is not an object.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise InputError("invalid JSON: arrays or objects nested too deeply to read") from None
    except UnicodeDecodeError as e:  # bytes that are not UTF-8
        raise InputError(f"invalid JSON: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(data, dict):
        raise InputError(f"expected a JSON object, got {_json_type(data)}")
    return data


def parse_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The validated `text`, `caption` and `audio_caption` (always lists), `label` (always a str) and `id` of an object.

    Other keys are ignored: media are checked by the caller, which knows where they live.

    Raises:
        InputError: a field has the wrong type, is empty, or holds text that is not valid Unicode.
    """
    record: dict[str, Any] = {}
    if "text" in data:
        record["text"] = _nonempty_str(data["text"], "text")
    for key in CAPTION_KEYS:
        if key in data:
            record[key] = _captions(data[key], key)
    if "label" in data:
        label = data["label"]
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        record["label"] = _nonempty_str(label, "label", "a string or an int")
    if "id" in data:
        if isinstance(data["id"], bool) or not isinstance(data["id"], (str, int)):
            raise InputError(f"id must be a string or an int, got {_json_type(data['id'])}")
        if isinstance(data["id"], str):
            _check_unicode(data["id"], "id")
        record["id"] = data["id"]
    return record


def make_item(index: int, record: dict[str, Any], draw: int | None) -> dict[str, Any]:
    """The item dict of a validated record: picks the caption and audio caption `draw` selects (the first when None)."""
    item: dict[str, Any] = {"index": index}
    if "messages" in record:
        item["media"] = {m: list(paths) for m, paths in record["media"].items()}
    for key in ("image", "audio", "text", "label", "id", "messages", "family", "answer", "conversation"):
        if key in record:
            item[key] = record[key]
    for key, all_key in CAPTION_KEYS.items():
        if key in record:
            captions = record[key]
            item[key] = captions[0 if draw is None else draw % len(captions)]
            item[all_key] = list(captions)
    return item


def _split_key(key: Key, size: int) -> tuple[int, int | None]:
    """(index, draw) of a dataset key; the index may be negative, as for a list."""
    if isinstance(key, tuple):
        if len(key) != 2:
            raise TypeError(f"a dataset key is an index or an (index, draw) pair, got a tuple of {len(key)}")
        index, draw = key
    else:
        index, draw = key, None
    index = int(index)
    if not -size <= index < size:
        raise IndexError(f"index {index} is out of range for a dataset of {size} examples")
    return index % size, None if draw is None else int(draw)


def _captions(value: Any, key: str) -> list[str]:
    """The reference captions of a `caption` or `audio_caption` value: a str, or a non-empty list of str."""
    if isinstance(value, list):
        if not value:
            raise InputError(f"{key} is an empty list; give at least one reference caption")
        return [_nonempty_str(c, f"{key}[{i}]") for i, c in enumerate(value)]
    return [_nonempty_str(value, key, "a string or a list of strings")]


def _nonempty_str(value: Any, name: str, expected: str = "a string") -> str:
    if not isinstance(value, str):
        raise InputError(f"{name} must be {expected}, got {_json_type(value)}")
    if not value:
        raise InputError(f"{name} is an empty string")
    _check_unicode(value, name)
    return value


def _check_unicode(value: str, name: str) -> None:
    """Refuses text that cannot be encoded (a lone surrogate from an unpaired "\\ud800" escape in the JSON)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        raise InputError(
            f"{name} holds a lone surrogate U+{code:04X} at character {e.start}, which is not valid Unicode text "
            "(an unpaired \\uD800-\\uDFFF escape in the JSON?)"
        ) from None


def _shown(value: str) -> str:
    """A path from the manifest as an error quotes it: in quotes, its middle elided when long."""
    return repr(shorten(value, 80))


def _os_reason(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


def _json_type(value: Any) -> str:
    """A value's type in JSON's words, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    return "an array" if isinstance(value, list) else "an object"


def _describe_skips(skipped: list[tuple[int, str]]) -> str:
    listed = "; ".join(f"line {line}: {reason}" for line, reason in skipped[:_SKIPS_LISTED])
    more = f"; and {len(skipped) - _SKIPS_LISTED} more" if len(skipped) > _SKIPS_LISTED else ""
    return f"skipped {len(skipped)} bad line{'s' if len(skipped) != 1 else ''}: {listed}{more}"
