"""The built wheel ships every subpackage and YAML file (an editable install would hide an omission)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_every_subpackage_and_config(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("mmfm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for source, package in [("mmfm", "mmfm"), ("encoders", "mmfm/encoders"), ("heads", "mmfm/heads")]:
        for path in (ROOT / source).rglob("*.py"):
            assert f"{package}/{path.relative_to(ROOT / source)}" in names, path
    for path in (ROOT / "configs").rglob("*.yaml"):
        assert f"mmfm/configs/{path.relative_to(ROOT / 'configs')}" in names, path
    assert "mmfm/py.typed" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mmfm = mmfm.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
