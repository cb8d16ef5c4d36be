"""The `kerasbn` command: fold BatchNormalization into neighbouring layers, export to ONNX.

    kerasbn export MODEL.keras -o OUT.onnx [--opset N] [--no-fold] [--samples N]
                                           [--atol X] [--rtol X] [--unsafe]
                                           [--int8 --calibration DATA.npy|.npz
                                            [--calibration-samples N] [--calibration-method M]
                                            [--min-agreement X]]
    kerasbn fold MODEL.keras -o OUT.keras [--unsafe]

Exit codes: 0 success; 1 the model was read but folding or exporting it failed (ONNX Runtime
disagreed with Keras beyond the tolerance, the conversion failed, the model is of a kind that
cannot be exported), and nothing was written; 2 bad usage, or a model file that cannot be read
or is refused (a Lambda layer without --unsafe).

This module lives in `kerasbn.export`, so importing it imports `kerasbn` first, which loads
TensorFlow without its start-up noise; the command only quiets what is left (Python warnings).
"""

from __future__ import annotations

import kerasbn  # noqa: F401  (first: TensorFlow loads quietly)
from kerasbn.export import quantize as _int8
from kerasbn.export.graph import fold_batchnorm
from kerasbn.export.onnx import OPSETS, VerificationError, atomic_path, human_size, to_onnx

import argparse
import os
import sys
import warnings

import keras
import numpy as np

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_EPILOG = """\
exit status:
  0  success
  1  folding or exporting failed (ONNX Runtime disagrees with Keras beyond the
     tolerance, the conversion failed, an unsupported model); nothing is written and
     an existing OUT is kept
  2  bad usage; the model file cannot be read, or is refused in safe mode

example:
  kerasbn export model.keras -o model.onnx
  kerasbn export model.keras -o model_int8.onnx --int8 --calibration images.npy
  kerasbn fold model.keras -o model_folded.keras
"""


class _UsageError(Exception):
    """Bad input the user can fix: reported in one line, exit status 2."""


def main(argv=None) -> int:
    """Run the command line with `argv` (default `sys.argv[1:]`); return the exit status."""
    parser = _parser()
    try:
        arguments = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse exits after --help (0) and on bad usage (2); a caller of main() gets the code.
        return int(exit_.code or 0)
    with warnings.catch_warnings():
        # Keras and TensorFlow warn about things the user cannot act on here (a compiled model
        # without its metrics, deprecated internals); the report says what matters.
        warnings.simplefilter("ignore")
        try:
            return arguments.run(arguments)
        except _UsageError as error:
            print(f"kerasbn {arguments.command}: error: {error}", file=sys.stderr)
            return EXIT_USAGE


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
        "with onnx.checker, and run ONNX Runtime on random inputs against the original\n"
        "Keras model: unless |onnx - keras| <= atol + rtol*|keras| everywhere, exit 1\n"
        "and write nothing.",
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
        "--samples",
        type=_positive_int,
        default=8,
        metavar="N",
        help="random inputs to verify on (default: %(default)s)",
    )
    export.add_argument(
        "--atol",
        type=_non_negative_float,
        default=1e-5,
        metavar="X",
        help="absolute tolerance of the verification (default: %(default)g)",
    )
    export.add_argument(
        "--rtol",
        type=_non_negative_float,
        default=1e-4,
        metavar="X",
        help="relative tolerance of the verification (default: %(default)g)",
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
    parser.add_argument(
        "-o", "--output", required=True, metavar=out_metavar, help=out_help
    )
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
        "folding; verification then compares the int8 file with the Keras model on the\n"
        "calibration data (--samples, --atol, --rtol are not used) and requires top-1 agreement",
    )
    group.add_argument("--int8", action="store_true", help="write an int8 model")
    group.add_argument(
        "--calibration",
        metavar="DATA",
        help="example inputs that set the int8 ranges: a .npy array (batch first) or a .npz "
        "of one array, or of one array per model input named after it",
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


def _fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text}")
    return value


def _load_calibration(arguments):
    """The --calibration data (None without --int8), after checking the int8 flags."""
    if arguments.int8 != (arguments.calibration is not None):
        raise _UsageError("--int8 and --calibration DATA.npy|.npz go together")
    if not arguments.int8:
        return None
    path = arguments.calibration
    if not os.path.isfile(path):
        raise _UsageError(f"no such calibration file: {path}")
    try:
        data = np.load(path, allow_pickle=False)  # pickles run code: never from a data file
    except (OSError, ValueError) as error:
        raise _UsageError(f"cannot read the calibration data {path}: {error}") from error
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            arrays = {name: data[name] for name in data.files}
        # One array: the model's one input, whatever its name in the file.
        return next(iter(arrays.values())) if len(arrays) == 1 else arrays
    return data


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _non_negative_float(text):
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


# --- the commands --------------------------------------------------------------------------------


def _run_export(arguments):
    _check_output(arguments.output)
    calibration = _load_calibration(arguments)
    model = _load(arguments.model, unsafe=arguments.unsafe)
    try:
        report = to_onnx(
            model,
            arguments.output,
            opset=arguments.opset,
            fold=arguments.fold,
            atol=arguments.atol,
            rtol=arguments.rtol,
            random_samples=arguments.samples,
            quantize="int8" if arguments.int8 else None,
            calibration=calibration,
            calibration_method=arguments.calibration_method,
            calibration_samples=arguments.calibration_samples,
            min_agreement=arguments.min_agreement,
        )
    except _int8.CalibrationError as error:
        raise _UsageError(f"--calibration {arguments.calibration}: {error}") from error
    except VerificationError as error:
        if error.report.fold is not None:
            print(error.report.fold.summary())
        return _failed("export", f"verification failed: {error}")
    except Exception as error:  # noqa: BLE001  (tf2onnx, onnx and Keras raise many kinds)
        return _failed("export", error)
    print(report)
    print(f"wrote {arguments.output}")
    return EXIT_OK


def _run_fold(arguments):
    if not arguments.output.endswith(".keras"):
        raise _UsageError(f"the output must be a .keras file. Received: -o {arguments.output}")
    _check_output(arguments.output)
    model = _load(arguments.model, unsafe=arguments.unsafe)
    try:
        folded, report = fold_batchnorm(model)
        with atomic_path(arguments.output, suffix=".keras") as temporary:
            folded.save(temporary)
            size = os.path.getsize(temporary)
    except Exception as error:  # noqa: BLE001  (as above)
        return _failed("fold", error)
    print(report.summary())
    for record in report.refused + report.kept:
        print(f"  {record.action} {record.bn}: {record.reason}")
    print(f"wrote {arguments.output} ({human_size(size)})")
    return EXIT_OK


def _failed(command, error):
    print(f"kerasbn {command}: error: {error}; nothing written", file=sys.stderr)
    return EXIT_FAILED


def _check_output(path):
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(directory):
        raise _UsageError(f"cannot write the output file. Received: -o {path}")


def _load(path, *, unsafe):
    if not os.path.isfile(path):
        raise _UsageError(f"no such model file: {path}")
    try:
        return keras.saving.load_model(path, safe_mode=not unsafe)
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
