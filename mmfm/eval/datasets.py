"""What `mmfm eval` evaluates besides manifests: a class folder, `DIR/<class>/*.png` or `DIR/<class>/*.wav`.

Each sub-folder is a class and the media files below it (found recursively, hidden files ignored) are its
examples, for zero-shot classification: the class names (the folder names, or the labels a user gives) are written
into the contrastive head's prompt templates and each file is classified among them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mmfm.config import MEDIA
from mmfm.errors import InputError


class ClassFolder:
    """The media files of a class-per-folder tree, all of one modality (images or audio).

    Args:
        root: the folder holding one folder per class.
        labels: the classes to evaluate, each the name of a folder of `root`; None takes every folder that holds
            media files, sorted by name. Folders not named are left out.

    Attributes:
        root: the folder as given.
        classes: the class names, in column order of the scores.
        modality: "image" or "audio".
        files: (path, class index) of every example, class by class, files sorted by path.

    Raises:
        InputError: `root` is not a folder; it holds media of both modalities; a label names no folder, or a
            folder with no media files ("a label with no examples"); fewer than two classes remain; or the
            labels repeat.
    """

    def __init__(self, root: str | Path, labels: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{root}: not a folder (a class folder holds one folder of media files per class)")
        found = {
            folder.name: _media_files(folder)
            for folder in sorted(self.root.iterdir())
            if folder.is_dir() and not folder.name.startswith(".")
        }
        if labels is None:
            self.classes = [name for name, files in found.items() if files]
        else:
            self.classes = list(labels)
            repeated = sorted({c for c in self.classes if self.classes.count(c) > 1})
            if repeated:
                raise InputError(f"--labels: {', '.join(map(repr, repeated))} given more than once")
            for label in self.classes:
                if not found.get(label):
                    where = "is an empty folder" if label in found else "names no folder"
                    known = ", ".join(n for n, files in found.items() if files) or "none"
                    raise InputError(
                        f"{root}: label {label!r} has no examples: it {where} of {root} (classes with media: {known})"
                    )
        if len(self.classes) < 2:
            have = f"only {self.classes[0]!r}" if self.classes else "none"
            raise InputError(
                f"{root}: zero-shot classification needs at least two classes (folders of media files), found {have}"
            )
        self.files = [(path, c) for c, name in enumerate(self.classes) for path in found[name]]
        kinds = {_modality(path) for path, _ in self.files}
        if len(kinds) > 1:
            raise InputError(f"{root}: holds both images and audio; a class folder holds one modality")
        (self.modality,) = kinds

    def __len__(self) -> int:
        return len(self.files)

    def paths(self) -> list[str]:
        """Every example's path, in `files` order."""
        return [str(path) for path, _ in self.files]

    def targets(self) -> list[int]:
        """Every example's class index, in `files` order."""
        return [c for _, c in self.files]


def _media_files(folder: Path) -> list[Path]:
    extensions = {ext for spec in MEDIA.values() for ext in spec.extensions}
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in extensions
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _modality(path: Path) -> str:
    return next(m for m, spec in MEDIA.items() if path.suffix.lower() in spec.extensions)
