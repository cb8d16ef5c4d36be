"""The `kerasbn` command: fold BatchNormalization into neighbouring layers, export to ONNX.

    kerasbn export MODEL.keras -o OUT.onnx [--opset N] [--no-fold] [--random-samples N]
                   [--samples-file X.npy|X.npz] [--input-shape D,D,...] [--atol X] [--rtol X]
                   [--unsafe] [--int8 --calibration X.npy|X.npz [--calibration-samples N]
                   [--calibration-method M] [--min-agreement X]]
    kerasbn fold MODEL.keras -o OUT.keras [--unsafe]

Exit codes: 0 success; 1 the model was read but folding or exporting it failed (ONNX Runtime
disagreed with Keras beyond the tolerance, the conversion failed, the model is of a kind that
cannot be exported), and nothing was written; 2 bad usage, or a model file that cannot be read
or is refused (a Lambda layer without --unsafe), or an output that cannot or must not be written
(its own input, a missing or read-only directory); 130 / 143 interrupted by SIGINT / SIGTERM,
nothing written and a previous output left as it was.

Models load with `compile=False`: export needs no optimizer, loss or metrics, and a file whose
compile configuration no longer deserializes (a legacy `.h5` with `loss="mse"`) still exports.

The installed `kerasbn` command starts in `kerasbn_programs.kerasbn_command`, which imports
TensorFlow without its start-up noise before this module loads; `main` quiets what is left while
it runs (Python warnings, TensorFlow's and tf2onnx's Python loggers).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import os
import signal
import sys
import threading
import warnings

import keras
import numpy as np

from kerasbn.export import files
from kerasbn.export import quantize as _int8
from kerasbn.export.convert import OPSETS
from kerasbn.export.errors import VerificationError
from kerasbn.export.folding import fold_batchnorm

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_EPILOG = """\
exit status:
  0    success
  1    folding or exporting failed (ONNX Runtime disagrees with Keras beyond the
       tolerance, the conversion failed, an unsupported model); nothing is written
       and an existing OUT is kept
  2    bad usage; the model file cannot be read or is refused in safe mode; OUT
       cannot be written (missing or read-only directory) or is MODEL itself
  130  interrupted (SIGINT), 143 terminated (SIGTERM): nothing written, OUT kept

example:
  kerasbn export model.keras -o model.onnx
  kerasbn export any_size.keras -o model.onnx --input-shape 224,224,3
  kerasbn export model.keras -o model_int8.onnx --int8 --calibration images.npy
  kerasbn fold model.keras -o model_folded.keras
"""


class _UsageError(Exception):
    """Bad input the user can fix: reported in one line, exit status 2."""


class _Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwinds like KeyboardInterrupt, so temporaries are deleted."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """SIGINT and SIGTERM while a command runs: each raises `_Interrupted` at once, and is
    remembered. The exception alone can be lost: Python runs a handler between any two
    bytecodes, inside a finalizer (`__del__`, a weakref callback) too, where an exception goes to
    `sys.unraisablehook` and the work goes on. So a command calls `raise_if_received` right
    before it puts its output in place."""

    def __init__(self):
        self.received = None

    def handle(self, signum, _frame):
        self.received = signum
        raise _Interrupted(signum)

    def raise_if_received(self):
        if self.received is not None:
            raise _Interrupted(self.received)


def main(argv=None) -> int:
    """Run the command line with `argv` (default `sys.argv[1:]`); return the exit status."""
    parser = _parser()
    try:
        arguments = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse exits after --help (0) and on bad usage (2); a caller of main() gets the code.
        return int(exit_.code or 0)
    with warnings.catch_warnings(), _quiet_loggers(), _signals_raise() as signals:
        # Keras and TensorFlow warn about things the user cannot act on here (deprecated
        # internals, a model loaded without its compile state); the report says what matters.
        warnings.simplefilter("ignore")
        try:
            status = arguments.run(arguments, signals)
            # A signal that surfaced as another error (TensorFlow's C code can turn one into a
            # SystemError) is still the reason the command stopped.
            signals.raise_if_received()
            return status
        except _UsageError as error:
            print(f"kerasbn {arguments.command}: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        except (_Interrupted, KeyboardInterrupt) as interruption:
            signum = getattr(interruption, "signum", signal.SIGINT)
            print(
                f"kerasbn {arguments.command}: {signal.Signals(signum).name}: stopped; nothing "
                "written",
                file=sys.stderr,
            )
            return 128 + signum


@contextlib.contextmanager
def _signals_raise():
    """`_Signals` handling SIGINT and SIGTERM while the command runs (main thread only: Python
    calls handlers there, and only there can they be installed)."""
    signals = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    previous = {signum: signal.signal(signum, signals.handle) for signum in _SIGNALS}
    try:
        yield signals
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _quiet_loggers():
    # tf2onnx and TensorFlow log deprecations and progress at WARNING/INFO through `logging`.
    loggers = [logging.getLogger(name) for name in ("tensorflow", "tf2onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _parser():
    parser = argparse.ArgumentParser(
        prog="kerasbn",
        description="Fold BatchNormalization into the layers next to it, and export Keras\n"
        "models to ONNX verified with ONNX Runtime.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = commands.add_parser(
        "export",
        help="fold BN and write an ONNX file verified against the original model",
        description="Fold BatchNormalization, convert with tf2onnx (dynamic batch size), check\n"
        "with onnx.checker, and run ONNX Runtime on random inputs (and --samples-file)\n"
        "against the original Keras model: unless |onnx - keras| <= atol + rtol*max|keras|\n"
        "everywhere (max over each example's output), exit 1 and write nothing.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(export, "OUT.onnx", "the ONNX file to write")
    export.add_argument(
        "--opset",
        type=int,
        default=17,
        choices=OPSETS,
        metavar="N",
        help=f"ONNX opset, {OPSETS.start} to {OPSETS.stop - 1} (default: %(default)s)",
    )
    export.add_argument(
        "--no-fold",
        dest="fold",
        action="store_false",
        help="export the model as it is, without folding BN",
    )
    export.add_argument(
        "--random-samples",
        type=_non_negative_int,
        metavar="N",
        help="random standard-normal inputs to verify on (default: 8, or 0 with --samples-file; "
        "with --input-shape, the number of random inputs of that shape)",
    )
    export.add_argument(
        "--samples-file",
        metavar="X.npy|X.npz",
        help="real inputs to verify on, batch first: a .npy array for a one-input model, or a "
        ".npz with one array per input name",
    )
    export.add_argument(
        "--input-shape",
        action="append",
        type=_shape,
        metavar="D,D,...",
        help="the shape of one example (no batch axis) for a model whose inputs have unknown "
        "dimensions, e.g. 224,224,3; once per input, in input order",
    )
    export.add_argument(
        "--atol",
        type=_non_negative_float,
        metavar="X",
        help="absolute tolerance of the verification (default: 1e-5; 1e-3 for mixed_float16, "
        "1e-2 for mixed_bfloat16 models)",
    )
    export.add_argument(
        "--rtol",
        type=_non_negative_float,
        metavar="X",
        help="relative tolerance of the verification (default: 1e-4; 1e-2 for mixed_float16, "
        "8e-2 for mixed_bfloat16 models)",
    )
    _add_int8_arguments(export)
    export.set_defaults(run=_run_export)

    fold = commands.add_parser(
        "fold",
        help="fold BN and save the folded Keras model",
        description="Fold every BatchNormalization that can be folded exactly into the layer\n"
        "before (or after) it, save the new model, and say why any other BN was kept.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(fold, "OUT.keras", "the Keras file to write (.keras)")
    fold.set_defaults(run=_run_fold)
    return parser


def _add_model_arguments(parser, out_metavar, out_help):
    parser.add_argument("model", metavar="MODEL.keras", help="the Keras model to read")
    parser.add_argument("-o", "--output", required=True, metavar=out_metavar, help=out_help)
    parser.add_argument(
        "--unsafe",
        action="store_true",
        help="load with safe_mode=False: allows Lambda layers, which run arbitrary Python code "
        "from the file; only for files you trust",
    )


def _add_int8_arguments(parser):
    # int8 (kerasbn.export.quantize)
    group = parser.add_argument_group(
        "int8",
        "quantize to int8 (ONNX Runtime static quantization, QDQ, per-channel weights) after\n"
        "folding; verification then compares the int8 file with the Keras model on\n"
        "--samples-file, or else on the calibration data, and requires top-1 agreement\n"
        "(--random-samples, --atol and --rtol are not used)",
    )
    group.add_argument("--int8", action="store_true", help="write an int8 model")
    group.add_argument(
        "--calibration",
        metavar="X.npy|X.npz",
        help="example inputs that set the int8 ranges, batch first: a .npy array for a "
        "one-input model, or a .npz with one array per input name",
    )
    group.add_argument(
        "--calibration-samples",
        type=_positive_int,
        default=_int8.DEFAULT_CALIBRATION_SAMPLES,
        metavar="N",
        help="use at most N calibration examples (default: %(default)s)",
    )
    group.add_argument(
        "--calibration-method",
        choices=tuple(_int8.CALIBRATION_METHODS),
        default="minmax",
        help="how an activation's range is chosen (default: %(default)s)",
    )
    group.add_argument(
        "--min-agreement",
        type=_fraction,
        default=_int8.DEFAULT_MIN_AGREEMENT,
        metavar="X",
        help="the top-1 agreement with Keras required, 0 to 1 (default: %(default)g)",
    )


def _bounded(convert, accepts, requirement):
    """An argparse type: `convert(text)`, refused with "must be {requirement}" unless
    `accepts` it (text that does not convert gets argparse's own "invalid ... value")."""

    def parse(text):
        value = convert(text)
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    parse.__name__ = convert.__name__  # argparse names the type in "invalid int value: 'x'"
    return parse


_positive_int = _bounded(int, lambda n: n >= 1, "an integer >= 1")
_non_negative_int = _bounded(int, lambda n: n >= 0, "an integer >= 0")
_fraction = _bounded(float, lambda x: 0 <= x <= 1, "a number from 0 to 1")
_non_negative_float = _bounded(float, lambda x: 0 <= x < float("inf"), "a finite number >= 0")


def _shape(text):
    try:
        shape = tuple(int(size) for size in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"must be sizes >= 1 separated by commas, like 224,224,3; got {text}"
        )
    return shape


# --- the commands --------------------------------------------------------------------------------


def _run_export(arguments, signals):
    from kerasbn.export.onnx import to_onnx  # tf2onnx and ONNX Runtime: only for export

    output = _checked_output(arguments)
    model = _load(arguments.model, unsafe=arguments.unsafe)
    samples, random_samples = _verification_inputs(model, arguments)
    calibration = _calibration(arguments)
    try:
        # ONNX Runtime's entropy and percentile calibrators print their progress with print().
        # Written beside OUT and put in place only if no signal arrived meanwhile (`_Signals`).
        with contextlib.redirect_stdout(io.StringIO()), files.atomic_path(output) as staged:
            report = to_onnx(
                model,
                staged,
                opset=arguments.opset,
                fold=arguments.fold,
                samples=samples,
                random_samples=random_samples,
                atol=arguments.atol,
                rtol=arguments.rtol,
                quantize="int8" if arguments.int8 else None,
                calibration=calibration,
                calibration_method=arguments.calibration_method,
                calibration_samples=arguments.calibration_samples,
                min_agreement=arguments.min_agreement,
            )
            signals.raise_if_received()
    except (TypeError, ValueError) as error:
        raise _UsageError(str(error)) from error
    except VerificationError as error:
        if error.report.fold is not None:
            print(error.report.fold.summary())
        return _failed("export", f"verification failed: {error}")
    except Exception as error:  # noqa: BLE001  (tf2onnx, onnx and Keras raise many kinds)
        return _failed("export", error)
    print(dataclasses.replace(report, path=output))
    print(f"wrote {output}")
    return EXIT_OK


def _verification_inputs(model, arguments):
    """(samples, random_samples) for to_onnx from --samples-file, --input-shape and
    --random-samples: random inputs of a given shape are passed as samples."""
    samples = None if arguments.samples_file is None else _read_samples(arguments.samples_file)
    shapes = arguments.input_shape
    if shapes is None:
        return samples, arguments.random_samples
    if samples is not None:
        raise _UsageError("give either --samples-file or --input-shape, not both")
    inputs = model.inputs
    if len(shapes) != len(inputs):
        raise _UsageError(
            f"the model has {len(inputs)} inputs; give --input-shape once for each. Received: "
            f"{len(shapes)} shapes"
        )
    count = 8 if arguments.random_samples is None else arguments.random_samples
    if count < 1:
        raise _UsageError("--input-shape needs --random-samples of 1 or more")
    rng = np.random.default_rng(0)
    arrays = []
    for shape, tensor in zip(shapes, inputs, strict=True):
        declared = tuple(tensor.shape[1:])
        fits = len(shape) == len(declared) and all(
            d is None or d == s for d, s in zip(declared, shape, strict=True)
        )
        if not fits:
            raise _UsageError(
                f"--input-shape {','.join(map(str, shape))} does not fit the model input of "
                f"shape {declared}"
            )
        array = rng.standard_normal((count, *shape))
        arrays.append(array.astype(keras.backend.standardize_dtype(tensor.dtype)))
    return (arrays[0] if len(arrays) == 1 else arrays), 0


def _calibration(arguments):
    """The --calibration data (None without --int8), after checking the int8 flags."""
    if arguments.int8 != (arguments.calibration is not None):
        raise _UsageError("--int8 and --calibration X.npy|X.npz go together")
    return _read_samples(arguments.calibration, "calibration") if arguments.int8 else None


def _read_samples(path, kind="samples"):
    if not os.path.isfile(path):
        raise _UsageError(f"no such {kind} file: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise _UsageError(f"cannot read the {kind} file {path}: {error}") from error
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    return loaded


def _run_fold(arguments, signals):
    if not arguments.output.endswith(".keras"):
        raise _UsageError(f"the output must be a .keras file. Received: -o {arguments.output}")
    output = _checked_output(arguments)
    model = _load(arguments.model, unsafe=arguments.unsafe)
    try:
        folded, report = fold_batchnorm(model)
        with files.atomic_path(output, suffix=".keras") as temporary:
            folded.save(temporary)
            size = os.path.getsize(temporary)
            signals.raise_if_received()
    except Exception as error:  # noqa: BLE001  (as above)
        return _failed("fold", error)
    print("\n".join(report.lines()))
    print(f"wrote {output} ({files.human_size(size)})")
    return EXIT_OK


def _failed(command, error):
    print(f"kerasbn {command}: error: {error}; nothing written", file=sys.stderr)
    return EXIT_FAILED


def _checked_output(arguments):
    try:
        return files.check_output_path(
            arguments.output, argument="-o/--output", sources=[arguments.model]
        )
    except ValueError as error:
        raise _UsageError(f"cannot write the output file: {error}") from error


def _load(path, *, unsafe):
    if not os.path.isfile(path):
        raise _UsageError(f"no such model file: {path}")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=not unsafe)
    except Exception as error:  # noqa: BLE001  (Keras raises many kinds for a bad file)
        if "safe_mode" in str(error) and not unsafe:
            raise _UsageError(
                f"{path} contains a Lambda layer (or other Python code), which safe mode refuses "
                "to load because loading would run code from the file. If you trust the file, "
                "pass --unsafe."
            ) from error
        raise _UsageError(f"cannot read the model {path}: {error}") from error


if __name__ == "__main__":
    sys.exit(main())
