"""Media files named by a user: a list of files and folders expanded to the images and sounds in them.

```python
from mmfm.inputs import expand_inputs
expand_inputs(["photos/", "seven.wav"])
# -> [("photos/a.png", "image"), ("photos/b/c.jpg", "image"), ("seven.wav", "audio")]
```

What the CLI's inference commands read, and what `mmfm serve`'s engine lists in a folder (`Engine.resolve_folder`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mmfm.config import MEDIA, shorten
from mmfm.errors import InputError

QUOTE_LIMIT = 200  # longest name an error message quotes whole (a 5,000-character path stays readable)


def expand_inputs(paths: Sequence[str], modalities: Sequence[str] = tuple(MEDIA)) -> list[tuple[str, str]]:
    """(file, modality) of every input: files as given, folders walked recursively in sorted order.

    In a folder, files whose extension no modality claims are skipped, as are hidden files and folders; a
    file named directly must be of a known type, and a folder must hold at least one such file.

    Args:
        paths: files and folders.
        modalities: the modalities read (keys of `mmfm.config.MEDIA`), by their files' extensions.

    Raises:
        InputError: a missing or unreadable path, a file of an unknown type, a folder with no file of a known type.
    """
    by_suffix = {ext: m for m in modalities for ext in MEDIA[m].extensions}
    kinds = "; ".join(f"{MEDIA[m].argument}: {' '.join(MEDIA[m].extensions)}" for m in modalities)
    found = []
    for text in paths:
        path = Path(text)
        try:
            is_dir, exists = path.is_dir(), path.exists()
        except (OSError, ValueError) as e:
            raise InputError(f"{quoted(text)}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
        if is_dir:
            files = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in by_suffix
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and p.is_file()
            )
            if not files:
                raise InputError(f"{quoted(text)}: no files of a known type in this folder or below ({kinds})")
            found += [(str(p), by_suffix[p.suffix.lower()]) for p in files]
        elif not exists:
            raise InputError(f"{quoted(text)}: no such file or folder")
        elif path.suffix.lower() not in by_suffix:
            raise InputError(f"{quoted(text)}: unknown file type '{quoted(path.suffix.lower())}'; {kinds}")
        else:
            found.append((text, by_suffix[path.suffix.lower()]))
    return found


def printable(text: str) -> str:
    """`text` as valid UTF-8 for printing: bytes of a non-UTF-8 file name are shown as \\xNN escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def quoted(text: str) -> str:
    """A name (a path, an argument) as error messages quote it: printable, and shortened in the middle when very
    long."""
    return shorten(printable(text), QUOTE_LIMIT)
