"""`import mmfm` and `mmfm --help` leave the heavy optional libraries unimported until a feature needs them.

Each check runs in a fresh interpreter, since this test process has long imported everything. A library counts as
imported when its top-level package is in `sys.modules`.
"""

import json
import subprocess
import sys
from pathlib import Path

import mmfm

REPO = Path(__file__).resolve().parents[1]
# Libraries that take from a tenth of a second to seconds to import and that only some features use.
HEAVY = (
    "diffusers",
    "open_clip",
    "peft",
    "sklearn",
    "tensorboard",
    "timm",
    "torchvision",
    "transformers",
    "webdataset",
)


def heavy_imported_by(code: str) -> list[str]:
    """The HEAVY libraries in `sys.modules` after running `code` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_import_mmfm_imports_no_heavy_library():
    assert heavy_imported_by("import mmfm") == []


def test_help_imports_no_heavy_library():
    code = "from mmfm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert heavy_imported_by(code) == []


def test_version_prints_the_version():
    proc = subprocess.run(
        [sys.executable, "-m", "mmfm", "--version"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"mmfm {mmfm.__version__}"


def test_a_model_with_an_image_encoder_imports_timm_and_without_image_gen_no_diffusers():
    # The check above would pass if nothing were ever detected; building a model shows that it detects timm.
    imported = heavy_imported_by("import mmfm\nmmfm.create_model('mmfm-tiny')")
    assert "timm" in imported
    assert "diffusers" not in imported  # mmfm-tiny has no image_gen head
