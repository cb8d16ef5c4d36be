"""The built wheel holds `kerasbn/export/` and imports from itself, not from the source tree;
importing the library leaves the process alone, and the programs' entry point is quiet."""

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
    assert "kerasbn_programs.py" in names, "the programs' start-up module ships beside the package"
    entry_points_text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "kerasbn = kerasbn_programs:kerasbn_command" in entry_points_text


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


_WATCH_IMPORT = """
import os, sys
redirected = []
real_dup2 = os.dup2
def watched_dup2(fd, fd2, *args, **kwargs):
    redirected.append(fd2)
    return real_dup2(fd, fd2, *args, **kwargs)
os.dup2 = watched_dup2
before = dict(os.environ)
# What the libraries kerasbn imports do on import is theirs (ONNX Runtime's quantization tools
# import sympy, which adds a warnings filter on Python 3.10); kerasbn's own is measured after.
import logging, warnings
import keras, onnx, onnxruntime.quantization.shape_inference, tensorflow, tf2onnx
names = list(logging.root.manager.loggerDict)  # kerasbn's imports may add (unset) loggers
def state():
    loggers = [(name, logging.getLogger(name).level) for name in names]
    return (list(warnings.filters), logging.root.level, loggers, sys.stdout, sys.stderr,
            keras.mixed_precision.global_policy().name, keras.config.floatx(),
            tensorflow.config.functions_run_eagerly())
libraries = state()
import kerasbn, kerasbn.export
after = dict(os.environ)
changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
print("redirected", redirected)
print("environment", changed)
print("global state unchanged", state() == libraries)
"""


def test_importing_kerasbn_leaves_the_process_streams_and_environment_alone(tmp_path):
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it
    result = subprocess.run(
        [sys.executable, "-c", _WATCH_IMPORT], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300, check=True,
    )
    assert "redirected []" in result.stdout, result.stdout
    assert "environment []" in result.stdout, result.stdout
    assert "global state unchanged True" in result.stdout, result.stdout


def test_programs_start_tensorflow_quietly_and_restore_stderr(tmp_path):
    code = (
        "import os, sys, kerasbn_programs; kerasbn_programs.quiet_tensorflow_import(); "
        "import kerasbn; print(os.environ['TF_CPP_MIN_LOG_LEVEL']); "
        "print('stderr still works', file=sys.stderr)"
    )
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300, check=True,
    )
    assert result.stdout.split() == ["2"]
    assert result.stderr == "stderr still works\n", "TensorFlow start-up noise or a lost stderr"
