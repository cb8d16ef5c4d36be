"""The built wheel holds `kerasbn/export/` and imports from itself, not from the source tree."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "-w", str(out), str(ROOT)],
        check=True, timeout=300,
    )
    (path,) = out.glob("kerasbn-*.whl")
    return path


def test_wheel_maps_export_folder_into_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "kerasbn/export/__init__.py" in names
    assert "kerasbn/layer.py" in names
    assert not any(name.startswith("export/") for name in names), "no top-level `export`"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "kerasbn = kerasbn.export.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_unpacked_wheel_imports_kerasbn_export(wheel, tmp_path):
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    code = (
        "import kerasbn, kerasbn.export; "
        "print(kerasbn.__file__); print(kerasbn.export.__file__)"
    )
    # Run from an empty directory with the unpacked wheel first on the path, so the source
    # tree (and the editable install's finder, which comes after PYTHONPATH) cannot answer.
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it, not as pytest's has it
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300, check=True,
    )
    files = result.stdout.split()
    assert files[0] == str(unpacked / "kerasbn" / "__init__.py")
    assert files[1] == str(unpacked / "kerasbn" / "export" / "__init__.py")
    assert "I0000" not in result.stderr, "importing kerasbn prints TensorFlow start-up noise"
