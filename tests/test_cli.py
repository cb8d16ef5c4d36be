"""The `kerasbn` command: exit codes, what it prints, safe loading, and the installed script.

Tests call `main([...])` in the test process (TensorFlow is already loaded); one test runs the
installed console script in a fresh process, where start-up noise would show.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest

import kerasbn
from kerasbn.export import cli, fold_batchnorm
from kerasbn.export import onnx as onnx_module
from tests.helpers import bn_layers, randomize_bn

L = keras.layers


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A small compiled model with three foldable BN and one refused (after a relu)."""
    inputs = keras.Input((12, 12, 3))
    x = L.Conv2D(4, 3, use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.DepthwiseConv2D(3)(x)
    x = kerasbn.BatchNormalization()(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(3, use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.Dense(2, activation="relu", name="dense_relu")(x)
    x = L.BatchNormalization(name="after_relu")(x)
    model = keras.Model(inputs, x)
    randomize_bn(model, np.random.default_rng(0))
    model.compile("adam", "mse")  # a compiled file, as users save them
    path = tmp_path_factory.mktemp("models") / "model.keras"
    model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def lambda_file(tmp_path_factory):
    model = keras.Sequential([keras.Input((4,)), L.Dense(3), L.Lambda(lambda t: t * 2.0)])
    path = tmp_path_factory.mktemp("models") / "lambda.keras"
    model.save(path)
    return str(path)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- export --------------------------------------------------------------------------------------


def test_export_writes_a_verified_file_and_reports(model_file, tmp_path, capsys):
    out_path = tmp_path / "model.onnx"
    code, out, err = run(capsys, "export", model_file, "-o", out_path)
    assert code == cli.EXIT_OK, err
    assert err == ""
    onnx.checker.check_model(onnx.load(out_path))
    assert "4 BatchNormalization layers: 3 folded (0 forward), 1 refused, 0 kept" in out
    assert "refused after_relu: 'dense_relu' applies the activation 'relu'" in out  # and why
    assert "max abs error" in out and "opset 17" in out and " kB" in out
    assert f"{out_path}: " in out and ".tmp" not in out  # the file's own name, never a staging one
    assert out.rstrip().endswith(f"wrote {out_path}")


def test_export_options_reach_to_onnx(model_file, tmp_path, capsys):
    code, out, _ = run(
        capsys, "export", model_file, "-o", tmp_path / "m.onnx", "--opset", "13", "--no-fold",
        "--random-samples", "3", "--atol", "1e-4", "--rtol", "1e-3",
    )
    assert code == cli.EXIT_OK
    assert "opset 13" in out and "not folded" in out
    assert "verified on 3 samples" in out and "atol=0.0001, rtol=0.001" in out


def test_failed_verification_exits_1_and_writes_nothing(model_file, tmp_path, capsys, monkeypatch):
    def broken_fold(model):
        folded, report = fold_batchnorm(model)
        beta = folded.get_layer("after_relu").beta  # the last layer: its error shows as is
        beta.assign(beta + 0.1)
        return folded, report

    monkeypatch.setattr(onnx_module, "fold_batchnorm", broken_fold)
    code, _, err = run(capsys, "export", model_file, "-o", tmp_path / "m.onnx")
    assert code == cli.EXIT_FAILED
    assert "verification failed" in err and "max abs error" in err and "nothing written" in err
    assert os.listdir(tmp_path) == []


# --- fold ----------------------------------------------------------------------------------------


def test_fold_saves_a_folded_model(model_file, tmp_path, capsys):
    out_path = tmp_path / "folded.keras"
    code, out, err = run(capsys, "fold", model_file, "-o", out_path)
    assert code == cli.EXIT_OK, err
    assert "4 BatchNormalization layers: 3 folded (0 forward), 1 refused, 0 kept" in out
    assert out.rstrip().endswith(" kB)")

    original = keras.saving.load_model(model_file, compile=False)
    folded = keras.saving.load_model(out_path)
    assert [bn.name for bn in bn_layers(folded)] == ["after_relu"]
    x = np.random.default_rng(1).standard_normal((4, 12, 12, 3)).astype("float32")
    np.testing.assert_allclose(folded(x), original(x, training=False), rtol=1e-4, atol=1e-5)


def test_fold_output_must_be_a_keras_file(model_file, tmp_path, capsys):
    code, _, err = run(capsys, "fold", model_file, "-o", tmp_path / "folded.h5")
    assert code == cli.EXIT_USAGE
    assert "must be a .keras file" in err


# --- safe mode -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command, suffix", [("export", ".onnx"), ("fold", ".keras")])
def test_lambda_is_refused_in_safe_mode_and_allowed_with_unsafe(
    command, suffix, lambda_file, tmp_path, capsys
):
    out_path = tmp_path / f"out{suffix}"
    code, _, err = run(capsys, command, lambda_file, "-o", out_path)
    assert code == cli.EXIT_USAGE
    assert "Lambda layer" in err and "--unsafe" in err
    assert not out_path.exists()

    code, _, err = run(capsys, command, lambda_file, "-o", out_path, "--unsafe")
    assert code == cli.EXIT_OK, err
    assert out_path.exists()


# --- bad usage -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required: COMMAND"),
        (["convert", "m.keras"], "invalid choice: 'convert'"),
        (["export", "MODEL"], "required: -o/--output"),
        (["export", "MODEL", "-o", "OUT", "--opset", "25"], "invalid choice: 25"),
        (["export", "MODEL", "-o", "OUT", "--opset", "x"], "invalid int value: 'x'"),
        (["export", "MODEL", "-o", "OUT", "--atol", "-1"], "must be a finite number >= 0, got -1"),
        (["export", "MODEL", "-o", "OUT", "--rtol", "nan"], "must be a finite number >= 0"),
        (["export", "MODEL", "-o", "OUT", "--random-samples", "-1"], "must be an integer >= 0"),
        (["fold", "MODEL", "-o", "OUT.keras", "--opset", "13"], "unrecognized arguments"),
    ],
)
def test_bad_usage_exits_2(argv, message, model_file, tmp_path, capsys):
    argv = [model_file if a == "MODEL" else str(tmp_path / a) if a.startswith("OUT") else a
            for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == cli.EXIT_USAGE
    assert message in err


def test_missing_or_unreadable_model_exits_2(tmp_path, capsys):
    code, _, err = run(capsys, "export", tmp_path / "none.keras", "-o", tmp_path / "m.onnx")
    assert code == cli.EXIT_USAGE and "no such model file" in err

    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a zip file")
    code, _, err = run(capsys, "fold", garbage, "-o", tmp_path / "out.keras")
    assert code == cli.EXIT_USAGE and "cannot read the model" in err
    assert sorted(os.listdir(tmp_path)) == ["garbage.keras"]


def test_unwritable_output_exits_2(model_file, tmp_path, capsys):
    code, _, err = run(capsys, "export", model_file, "-o", tmp_path / "no" / "m.onnx")
    assert code == cli.EXIT_USAGE and "cannot write the output file" in err


def test_help_is_complete(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == cli.EXIT_OK
    for word in ("export", "fold", "exit status", "0    success", "1    ", "2    bad usage", "143"):
        assert word in out
    code, out, _ = run(capsys, "export", "--help")
    assert code == cli.EXIT_OK
    for flag in ("-o OUT.onnx", "--opset N", "--no-fold", "--random-samples N", "--samples-file",
                 "--input-shape D,D,...", "--atol X", "--rtol X",
                 "--unsafe", "13 to 18", "atol + rtol*max|keras|"):
        assert flag in out
    code, out, _ = run(capsys, "fold", "--help")
    assert code == cli.EXIT_OK and "-o OUT.keras" in out and "--unsafe" in out


# --- the installed console script ----------------------------------------------------------------


def test_installed_script_exports_quietly(model_file, tmp_path):
    script = Path(sys.executable).with_name("kerasbn")
    assert script.exists(), f"the console script is not installed next to {sys.executable}"
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it
    result = subprocess.run(
        [str(script), "export", model_file, "-o", str(tmp_path / "m.onnx")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    # No TensorFlow start-up lines, absl logs or Python warnings: stderr stays empty.
    assert result.stderr == ""
    assert "3 folded (0 forward), 1 refused, 0 kept" in result.stdout
    assert (tmp_path / "m.onnx").exists()


# --- nothing lost --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["export", "fold"])
def test_output_that_is_its_own_input_is_refused(command, model_file, capsys, tmp_path):
    before = Path(model_file).read_bytes()
    link = tmp_path / "link.keras"
    link.symlink_to(model_file)
    for output in (model_file, link):
        code, _, err = run(capsys, command, model_file, "-o", output)
        assert code == cli.EXIT_USAGE
        assert "would destroy its own input" in err
    assert Path(model_file).read_bytes() == before


@pytest.fixture
def read_only_dir(tmp_path):
    directory = tmp_path / "read_only"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i")
    yield directory
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(directory)], check=True)
    directory.chmod(0o755)


def test_read_only_output_directory_exits_2_before_loading(
    model_file, read_only_dir, capsys, monkeypatch
):
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run(capsys, "export", model_file, "-o", read_only_dir / "m.onnx")
    assert code == cli.EXIT_USAGE
    assert "is not writable" in err and "read_only/m.onnx" in err


def test_legacy_h5_compiled_with_a_loss_string_exports(tmp_path, capsys, rng):
    inputs = keras.Input((6,))
    model = keras.Model(inputs, L.BatchNormalization()(L.Dense(3)(inputs)))
    randomize_bn(model, rng)
    model.compile("adam", loss="mse", metrics=["mae"])
    path = tmp_path / "legacy.h5"
    model.save(path)
    code, out, err = run(capsys, "export", path, "-o", tmp_path / "m.onnx")
    assert code == cli.EXIT_OK, err
    assert "1 folded" in out


# --- inputs to verify on -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def any_size_file(tmp_path_factory):
    """A fully convolutional model: its spatial dimensions are unknown."""
    inputs = keras.Input((None, None, 3), name="image")
    x = L.BatchNormalization()(L.Conv2D(4, 3, use_bias=False)(inputs))
    model = keras.Model(inputs, L.GlobalAveragePooling2D()(x))
    randomize_bn(model, np.random.default_rng(0))
    path = tmp_path_factory.mktemp("models") / "any_size.keras"
    model.save(path)
    return str(path)


def test_unknown_dimensions_need_a_shape_and_say_so(any_size_file, tmp_path, capsys):
    code, _, err = run(capsys, "export", any_size_file, "-o", tmp_path / "m.onnx")
    assert code == cli.EXIT_USAGE
    assert "unknown dimension 1" in err
    assert os.listdir(tmp_path) == []


def test_input_shape_gives_random_inputs_their_shape(any_size_file, tmp_path, capsys):
    code, out, err = run(capsys, "export", any_size_file, "-o", tmp_path / "m.onnx",
                         "--input-shape", "10,12,3", "--random-samples", "3")
    assert code == cli.EXIT_OK, err
    assert "verified on 3 samples" in out
    session_input = onnx.load(tmp_path / "m.onnx").graph.input[0]
    dims = [d.dim_value or d.dim_param for d in session_input.type.tensor_type.shape.dim]
    assert dims[1:] == [d for d in dims[1:] if not isinstance(d, int) or d == 3]  # still dynamic


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--input-shape", "10,12"], r"does not fit the model input of shape \(None, None, 3\)"),
        (["--input-shape", "10,12,4"], "does not fit"),
        (["--input-shape", "10,x,3"], "must be sizes >= 1 separated by commas"),
        (["--input-shape", "8,8,3", "--input-shape", "8,8,3"], "has 1 inputs"),
    ],
)
def test_bad_input_shapes_exit_2(argv, message, any_size_file, tmp_path, capsys):
    code, _, err = run(capsys, "export", any_size_file, "-o", tmp_path / "m.onnx", *argv)
    assert code == cli.EXIT_USAGE
    assert re.search(message, err), err


@pytest.mark.parametrize("kind", ["npy", "npz"])
def test_samples_file_is_verified_on(kind, any_size_file, tmp_path, capsys):
    images = np.random.default_rng(0).standard_normal((5, 9, 7, 3)).astype("float32")
    path = tmp_path / f"x.{kind}"
    np.save(path, images) if kind == "npy" else np.savez(path, image=images)
    code, out, err = run(capsys, "export", any_size_file, "-o", tmp_path / "m.onnx",
                         "--samples-file", path)
    assert code == cli.EXIT_OK, err
    assert "verified on 5 samples" in out  # real inputs given: no random ones by default


def test_bad_samples_file_exits_2(any_size_file, tmp_path, capsys):
    np.savez(tmp_path / "x.npz", wrong=np.zeros((2, 4, 4, 3)))
    code, _, err = run(capsys, "export", any_size_file, "-o", tmp_path / "m.onnx",
                       "--samples-file", tmp_path / "x.npz")
    assert code == cli.EXIT_USAGE
    assert "`samples` lacks the inputs ['image']" in err
    code, _, err = run(capsys, "export", any_size_file, "-o", tmp_path / "m.onnx",
                       "--samples-file", tmp_path / "none.npy")
    assert code == cli.EXIT_USAGE and "no such samples file" in err


# --- signals: a real process, a real signal ------------------------------------------------------


@pytest.fixture(scope="module")
def slow_model_file(tmp_path_factory):
    """A model whose verification on many random samples takes seconds."""
    inputs = keras.Input((32, 32, 3))
    x = inputs
    for _ in range(4):
        x = L.ReLU()(L.BatchNormalization()(L.Conv2D(32, 3, padding="same", use_bias=False)(x)))
    model = keras.Model(inputs, L.GlobalAveragePooling2D()(x))
    randomize_bn(model, np.random.default_rng(0))
    path = tmp_path_factory.mktemp("models") / "slow.keras"
    model.save(path)
    return str(path)


def _catches_sigterm(pid):
    """Whether process `pid` has a handler for SIGTERM (Linux: the SigCgt mask in /proc), which
    the command installs once it starts working; before that there is nothing to lose."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(line for line in status if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


def _wait_for(condition, process, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("the export finished (or stalled) before the signal could be sent")


class _SignalInFinalizer:
    """Sends `signum` to this process from a finalizer: Python runs the signal's handler inside
    `__del__`, where an exception cannot propagate (it goes to `sys.unraisablehook`). Library
    code runs finalizers at any moment (TensorFlow's resources, weakref callbacks), so a signal
    can be lost this way in a real export."""

    def __init__(self, signum):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)
        for _ in range(1000):  # the handler runs between two bytecodes of this loop
            pass


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("command", ["export", "fold"])
@pytest.mark.parametrize("then", ["work goes on", "another error"])
def test_a_signal_lost_inside_library_code_still_writes_nothing(
    signum, command, then, model_file, tmp_path, capsys, monkeypatch
):
    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda hook: swallowed.append(hook.exc_type))
    real_fold = onnx_module.fold_batchnorm if command == "export" else cli.fold_batchnorm

    def fold_losing_a_signal(model):
        _SignalInFinalizer(signum)  # collected at once: the signal arrives and is swallowed
        if then == "another error":  # as when TensorFlow's C code turns it into a SystemError
            raise SystemError("error return without exception set")
        return real_fold(model)

    monkeypatch.setattr(onnx_module if command == "export" else cli, "fold_batchnorm",
                        fold_losing_a_signal)
    output = tmp_path / ("m.onnx" if command == "export" else "m.keras")
    output.write_bytes(b"previous output")
    code, out, err = run(capsys, command, model_file, "-o", output)
    assert len(swallowed) == 1  # the handler's exception was lost, as in the scenario
    assert code == 128 + signum, err
    assert f"{signal.Signals(signum).name}: stopped; nothing written" in err
    assert "wrote" not in out
    assert os.listdir(tmp_path) == [output.name]
    assert output.read_bytes() == b"previous output"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("when", ["converting", "verifying"])
def test_a_signal_leaves_no_temporary_and_keeps_the_previous_output(
    signum, when, slow_model_file, tmp_path
):
    output = tmp_path / "m.onnx"
    output.write_bytes(b"previous export")
    script = Path(sys.executable).with_name("kerasbn")
    process = subprocess.Popen(
        [str(script), "export", slow_model_file, "-o", str(output), "--random-samples", "3000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_for(lambda: _catches_sigterm(process.pid), process)
        if when == "verifying":  # the temporary file is written: verification is running
            _wait_for(lambda: any(n.endswith(".tmp") for n in os.listdir(tmp_path)), process)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, err
    assert f"{signal.Signals(signum).name}: stopped; nothing written" in err
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert output.read_bytes() == b"previous export"
