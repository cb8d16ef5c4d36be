"""Export a Keras model to ONNX with its BatchNormalization folded, and verify the file.

    model ──fold_batchnorm──► folded model ──tf.function(input signature)──► tf2onnx ──► ONNX
    ONNX ──onnx.checker──► temporary file beside `path`
         ──ONNX Runtime on that file vs the ORIGINAL model in inference mode──► os.replace

Conversion goes through `tf2onnx.convert.from_function`: `from_keras` reads Keras 2 internals
and fails on Keras 3 Sequential models (KeyError keras_tensor_…), while every built Keras 3
model can be called inside a `tf.function` with an explicit signature. The signature's batch
dimension is None, so the ONNX model takes any batch size. `large_model=True` is never used: it
breaks under NumPy 2 (and a model needing it, over 2 GB, is out of scope).

ONNX inputs are named after the model's input layers and outputs after its output layers.

Verification compares element-wise with the Keras output as the reference, as `numpy.isclose`
does:

    |onnx − keras| <= atol + rtol·|keras|

so `atol` bounds the error of outputs near zero and `rtol` that of large ones. The reported
`max_rel_error` is max |onnx − keras| / |keras| over the nonzero Keras outputs: an output that
is nearly zero can make it large while the check, which gives it `atol`, passes.

Node counts. tf2onnx lowers an inference BN to Mul + Add, and merges those into a channels_last
Conv2D, Conv3D or SeparableConv2D itself (measured with tf2onnx 1.17): there folding changes
nothing in the file. Folding removes the Mul + Add where tf2onnx cannot: after Dense, Conv1D,
channels_first convolutions, depthwise, transposed convolutions and SeparableConv1D. To report
both counts, a fold that removed a BN costs one more conversion (of the unfolded model, in
memory); `baseline=False` skips it.
"""

from __future__ import annotations

from kerasbn.export import quantize as _int8
from kerasbn.export.graph import fold_batchnorm
from kerasbn.export.report import FoldReport

import contextlib
import math
import numbers
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import keras
import numpy as np
import onnx
import onnxruntime
import tensorflow as tf
import tf2onnx

OPSETS = range(13, 19)
_RANDOM_SEED = 0


class VerificationError(RuntimeError):
    """ONNX Runtime and the original Keras model disagree beyond the tolerance.

    Attributes:
        report: the `ExportReport` of the export that failed (its file was not written).
    """

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ExportReport:
    """What `to_onnx` wrote and how well it agrees with the original model.

    Attributes:
        path: the ONNX file.
        opset: the ONNX opset it uses.
        node_count: ONNX nodes in the file.
        unfolded_node_count: ONNX nodes tf2onnx gives for the original, unfolded model (equal to
            `node_count` when nothing was folded; None when `baseline=False` skipped it).
        fold: the `FoldReport`, or None when `fold=False`.
        verified_samples: examples run through ONNX Runtime and Keras (0: not verified).
        max_abs_error, max_rel_error: the largest |onnx − keras| and |onnx − keras| / |keras|
            (over nonzero Keras outputs) on those examples; None when not verified.
        atol, rtol: the tolerance of the check |onnx − keras| <= atol + rtol·|keras|.
        file_size: bytes of the ONNX file.
        quantization: the `kerasbn.export.quantize.QuantizationReport` of an int8 export
            (structure, sizes, agreement with Keras); None for float32.
        seconds: wall time of each step ("fold", "convert", "baseline", "quantize", "verify").
    """

    path: str
    opset: int
    node_count: int
    unfolded_node_count: int | None
    fold: FoldReport | None
    verified_samples: int
    max_abs_error: float | None
    max_rel_error: float | None
    atol: float
    rtol: float
    file_size: int
    quantization: _int8.QuantizationReport | None = None
    seconds: Mapping[str, float] = field(default_factory=dict, compare=False)

    @property
    def folded(self) -> int:
        return len(self.fold.folded) if self.fold else 0

    @property
    def refused(self) -> int:
        return len(self.fold.refused) if self.fold else 0

    @property
    def kept(self) -> int:
        return len(self.fold.kept) if self.fold else 0

    def __str__(self) -> str:
        unfolded = "not converted" if self.unfolded_node_count is None else self.unfolded_node_count
        lines = [
            f"{self.path}: {human_size(self.file_size)}, opset {self.opset}, "
            f"{self.node_count} ONNX nodes (unfolded export: {unfolded})"
        ]
        if self.fold is None:
            lines.append("BatchNormalization: not folded (fold=False)")
        else:
            lines.append(
                f"BatchNormalization: {self.folded} folded, {self.refused} refused, "
                f"{self.kept} kept"
            )
            lines += [
                f"  {r.action} {r.bn}: {r.reason}" for r in self.fold.refused + self.fold.kept
            ]
        if self.quantization is not None:
            lines += self.quantization.lines(self.file_size)
        elif self.verified_samples:
            lines.append(
                f"verified on {self.verified_samples} samples, ONNX Runtime vs the original "
                f"Keras model: max abs error {self.max_abs_error:.3g}, max rel error "
                f"{self.max_rel_error:.3g} (atol={self.atol:g}, rtol={self.rtol:g})"
            )
        else:
            lines.append("not verified (verify=False)")
        return "\n".join(lines)


def to_onnx(
    model,
    path,
    *,
    opset=17,
    fold=True,
    verify=True,
    samples=None,
    atol=1e-5,
    rtol=1e-4,
    random_samples=8,
    baseline=True,
    quantize=None,
    calibration=None,
    calibration_method="minmax",
    calibration_samples=_int8.DEFAULT_CALIBRATION_SAMPLES,
    min_agreement=_int8.DEFAULT_MIN_AGREEMENT,
) -> ExportReport:
    """Fold `model`'s BatchNormalization layers, convert to ONNX, verify, write `path` atomically.

    Args:
        model: a built Keras model (Sequential or Functional, one or several inputs). Never
            modified.
        path: where to write the .onnx file. It is replaced only by a file that passed
            `onnx.checker` and (with `verify`) verification; on failure a previous file stays.
        opset: ONNX opset, 13 to 18.
        fold: fold BN into neighbouring layers first (`kerasbn.export.fold_batchnorm`).
        verify: run the written file in ONNX Runtime and compare with the original model in
            inference mode; raise `VerificationError` when |onnx − keras| > atol + rtol·|keras|
            anywhere.
        samples: real inputs to verify on as well: an array (one input), a list of arrays in
            the order of `model.inputs`, or a dict from input name to array; batch first.
        atol, rtol: the verification tolerance, >= 0.
        random_samples: how many random standard-normal examples to verify on besides
            `samples` (their shapes come from the model's inputs, or `samples` where the model
            leaves a dimension unknown).
        baseline: also convert the unfolded model (in memory) to report its node count. This
            doubles the conversion time when a BN was folded.
        quantize: None (float32) or "int8": after folding and conversion, quantize with ONNX
            Runtime (static, QDQ format, int8 per-channel weights, uint8 activations); see
            `kerasbn.export.quantize`. Verification then compares the int8 file with the
            original float model on `samples`, or on `calibration` when `samples` is None
            (`random_samples`, `atol` and `rtol` are not used), and requires a top-1 agreement
            of `min_agreement` on classifier-shaped outputs.
        calibration: with quantize="int8", required: example inputs that set each activation's
            int8 range: an array, a list or dict of arrays (several inputs), a tf.data.Dataset
            or an iterable of batches (x or (x, y)); at most `calibration_samples` are read.
        calibration_method: how a range is chosen from the calibration data: "minmax" (default),
            "entropy" or "percentile" (see `kerasbn.export.quantize`).
        calibration_samples: the most calibration examples to use (default 256).
        min_agreement: with quantize="int8", the share of examples (0 to 1) whose top-1 class
            must agree with the Keras model's (default 0.99).

    Returns:
        An `ExportReport`.

    Raises:
        ValueError: a bad argument, or a model without defined inputs; before anything runs
            (`kerasbn.export.quantize.CalibrationError`, a ValueError, for calibration data
            that does not fit the model).
        onnx.checker.ValidationError: tf2onnx produced an invalid model.
        VerificationError: ONNX Runtime disagrees with Keras; no file is written.
    """
    _check_arguments(opset=opset, atol=atol, rtol=rtol, random_samples=random_samples)
    path = os.fspath(path)
    _check_path(path)
    inputs = _model_inputs(model)
    output_names = _output_names(model)
    # int8 (kerasbn.export.quantize): its arguments checked and its data read before converting.
    int8 = _int8.plan(
        quantize, calibration=calibration, calibration_method=calibration_method,
        calibration_samples=calibration_samples, min_agreement=min_agreement, samples=samples,
        verify=verify, inputs=inputs,
    )
    verify_float = verify and int8 is None  # an int8 file is verified by int8.quantize
    batches = _verification_batches(inputs, samples, random_samples) if verify_float else []
    if verify_float and not batches:
        raise ValueError(
            "Verification needs examples: pass `samples` or a positive `random_samples`. "
            f"Received: samples=None, random_samples={random_samples!r}"
        )

    seconds = {}
    with _timed(seconds, "fold"):
        exported, fold_report = fold_batchnorm(model) if fold else (model, None)
    with _timed(seconds, "convert"):
        proto = _convert(exported, opset, inputs, output_names)
        onnx.checker.check_model(proto, full_check=True)
    unfolded_node_count = len(proto.graph.node)
    if fold_report is not None and fold_report.folded:
        unfolded_node_count = None
        if baseline:
            with _timed(seconds, "baseline"):
                unfolded = _convert(model, opset, inputs, output_names)
            unfolded_node_count = len(unfolded.graph.node)
    quantization = None
    if int8 is not None:
        with _timed(seconds, "quantize"):
            proto, quantization = int8.quantize(proto, _keras_reference(model), output_names)

    with atomic_path(path) as temporary:
        _write_bytes(temporary, proto.SerializeToString())
        errors = None
        if batches:
            with _timed(seconds, "verify"):
                errors = _compare(
                    model, inputs, output_names, temporary, batches, atol=atol, rtol=rtol
                )
        report = ExportReport(
            path=path,
            opset=opset,
            node_count=len(proto.graph.node),
            unfolded_node_count=unfolded_node_count,
            fold=fold_report,
            verified_samples=(
                quantization.check.samples if quantization and quantization.check
                else sum(len(batch[0]) for batch in batches)
            ),
            max_abs_error=None if errors is None else errors.max_abs,
            max_rel_error=None if errors is None else errors.max_rel,
            atol=float(atol),
            rtol=float(rtol),
            file_size=os.path.getsize(temporary),
            quantization=quantization,
            seconds=seconds,
        )
        if quantization is not None and not quantization.passed:
            raise VerificationError(quantization.failure(), report)
        if errors is not None and errors.failed:
            # Raised inside the block: the temporary file is deleted, `path` left as it was.
            raise VerificationError(errors.message(atol=atol, rtol=rtol), report)
    return report


def convert(model, *, opset=17):
    """The ONNX `ModelProto` tf2onnx makes of `model` as it is (no fold, no check, no file).

    Batch dimension dynamic, inputs and outputs named after the model's input and output layers.
    """
    _check_arguments(opset=opset)
    return _convert(model, opset, _model_inputs(model), _output_names(model))


def _convert(model, opset, inputs, output_names):
    # `inputs` and `output_names` come from the original model: the folded one is a rebuild whose
    # layer names need not match, and the file should speak the user's names.
    signature = [tf.TensorSpec((None, *i.shape[1:]), i.dtype, name=i.name) for i in inputs]

    @tf.function(input_signature=signature, autograph=False)
    def forward(*tensors):
        outputs = model(_pack(model, list(tensors)), training=False)
        # A dict makes tf2onnx name the ONNX outputs after its keys.
        return dict(zip(output_names, keras.tree.flatten(outputs), strict=True))

    proto, _ = tf2onnx.convert.from_function(forward, input_signature=signature, opset=opset)
    return proto


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yield a fresh path beside `path`; on success rename it onto `path`, on error delete it.

    The temporary sits in the same directory because `os.replace` is atomic only within one file
    system. `suffix` serves writers that insist on an extension (Keras wants ".keras").
    """
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


# --- arguments ----------------------------------------------------------------------------------


def _check_arguments(*, opset, atol=0.0, rtol=0.0, random_samples=0):
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral) or opset not in OPSETS:
        raise ValueError(
            f"`opset` must be an integer from {OPSETS.start} to {OPSETS.stop - 1}. "
            f"Received: opset={opset!r}"
        )
    for name, value in (("atol", atol), ("rtol", rtol)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            0 <= value < math.inf
        ):
            raise ValueError(f"`{name}` must be a finite number >= 0. Received: {name}={value!r}")
    if isinstance(random_samples, bool) or not isinstance(random_samples, numbers.Integral) or (
        random_samples < 0
    ):
        raise ValueError(
            f"`random_samples` must be an integer >= 0. Received: random_samples={random_samples!r}"
        )


def _check_path(path):
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"`path` must be a file name, not a directory. Received: path={path!r}")
    if not os.path.isdir(directory):
        raise ValueError(f"The directory of `path` does not exist. Received: path={path!r}")


# --- the model's inputs and outputs --------------------------------------------------------------


@dataclass(frozen=True)
class _Input:
    name: str
    shape: tuple  # batch first, None where unknown
    dtype: str


def _model_inputs(model):
    try:
        tensors = model.inputs
    except AttributeError:
        tensors = None
    if not tensors:
        raise ValueError(
            "The model has no defined inputs: build it (`model.build(shape)`) or give it an "
            f"`keras.Input`. Received: model={model.name!r}"
        )
    names = _unique([_layer_name(t) for t in tensors])
    return [_Input(n, tuple(t.shape), str(t.dtype)) for n, t in zip(names, tensors, strict=True)]


def _output_names(model):
    return _unique([_layer_name(t) for t in model.outputs])


def _layer_name(tensor):
    # The layer that made a Keras tensor (its InputLayer, or an output layer).
    return tensor._keras_history.operation.name


def _unique(names):
    seen = {}
    result = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        result.append(name if count == 0 else f"{name}_{count}")
    return result


def _pack(model, tensors):
    # A Functional model may take a dict or a nested structure; others take one tensor.
    structure = getattr(model, "_inputs_struct", None)
    if structure is not None:
        return keras.tree.pack_sequence_as(structure, tensors)
    return tensors[0] if len(tensors) == 1 else tensors


# --- verification --------------------------------------------------------------------------------


def _verification_batches(inputs, samples, random_samples):
    """Batches to verify on, each a list of arrays in input order: `samples`, then random ones."""
    given = None if samples is None else _sample_arrays(inputs, samples)
    batches = [] if given is None else [given]
    if random_samples:
        rng = np.random.default_rng(_RANDOM_SEED)
        batches.append(
            [
                _random_array(rng, i, random_samples, None if given is None else given[k])
                for k, i in enumerate(inputs)
            ]
        )
    return batches


def _sample_arrays(inputs, samples):
    names = [i.name for i in inputs]
    if isinstance(samples, Mapping):
        missing = sorted(set(names) - set(samples))
        if missing:
            raise ValueError(
                f"`samples` lacks the inputs {missing}. Received: samples keys={sorted(samples)}"
            )
        arrays = [samples[n] for n in names]
    elif len(inputs) > 1:
        arrays = list(samples) if isinstance(samples, (list, tuple)) else [samples]
    else:
        arrays = [samples]
    if len(arrays) != len(inputs):
        raise ValueError(
            f"`samples` must hold one array per model input ({names}). "
            f"Received: {len(arrays)} arrays"
        )
    arrays = [np.asarray(a, dtype=i.dtype) for a, i in zip(arrays, inputs, strict=True)]
    for array, spec in zip(arrays, inputs, strict=True):
        fits = array.ndim == len(spec.shape) and all(
            d is None or d == s for d, s in zip(spec.shape[1:], array.shape[1:], strict=True)
        )
        if not fits:
            raise ValueError(
                f"`samples` for input {spec.name!r} must have shape {spec.shape}. "
                f"Received: shape={array.shape}"
            )
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(
            "`samples` must have one batch size for all inputs. "
            f"Received: batch sizes={[len(a) for a in arrays]}"
        )
    return arrays


def _random_array(rng, spec, count, like):
    shape = [count]
    for axis, size in enumerate(spec.shape[1:], start=1):
        if size is None and like is None:
            raise ValueError(
                f"Input {spec.name!r} has the unknown dimension {axis} (shape {spec.shape}): pass "
                "`samples` so that verification has a shape to test. Received: samples=None"
            )
        shape.append(like.shape[axis] if size is None else size)
    if np.issubdtype(np.dtype(spec.dtype), np.integer):
        # Token ids and the like: 0 and 1 are valid for any vocabulary.
        return rng.integers(0, 2, size=shape).astype(spec.dtype)
    return rng.standard_normal(shape).astype(spec.dtype)


@dataclass
class _Errors:
    """The running maxima of a comparison and its worst violation of the tolerance."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    violations: int = 0
    elements: int = 0
    worst: tuple | None = None  # (excess, output name, index, onnx value, keras value)
    shape_mismatch: str | None = None

    @property
    def failed(self):
        return self.worst is not None or self.shape_mismatch is not None

    def add(self, name, got, expected, *, atol, rtol):
        got = np.asarray(got, dtype=np.float64)
        expected = np.asarray(expected, dtype=np.float64)
        if got.shape != expected.shape:
            self.shape_mismatch = f"output {name!r}: onnx shape {got.shape}, keras {expected.shape}"
            return
        difference = np.abs(got - expected)
        magnitude = np.abs(expected)
        both_finite = np.isfinite(difference)
        if both_finite.any():
            self.max_abs = max(self.max_abs, float(difference[both_finite].max()))
            nonzero = both_finite & (magnitude > 0)
            if nonzero.any():
                relative = difference[nonzero] / magnitude[nonzero]
                self.max_rel = max(self.max_rel, float(relative.max()))
        bad = ~np.isclose(got, expected, rtol=rtol, atol=atol, equal_nan=True)
        self.elements += got.size
        self.violations += int(bad.sum())
        if bad.any():
            # How far past its allowance each violation is; non-finite ones count as infinite.
            excess = np.where(bad, difference / (atol + rtol * magnitude), -np.inf)
            excess[bad & ~both_finite] = np.inf
            index = np.unravel_index(int(np.argmax(excess)), excess.shape)
            if self.worst is None or excess[index] > self.worst[0]:
                self.worst = (float(excess[index]), name, index, got[index], expected[index])

    def message(self, *, atol, rtol):
        if self.shape_mismatch:
            return f"ONNX Runtime and Keras disagree on a shape: {self.shape_mismatch}"
        _, name, index, got, expected = self.worst
        allowed = atol + rtol * abs(expected)
        return (
            f"ONNX Runtime disagrees with the original Keras model on {self.violations} of "
            f"{self.elements} output values: max abs error {self.max_abs:.3g}, max rel error "
            f"{self.max_rel:.3g}, tolerance |onnx - keras| <= atol + rtol*|keras| with "
            f"atol={atol:g}, rtol={rtol:g}. Worst: output {name!r} at {tuple(map(int, index))}: "
            f"onnx={got:.7g}, keras={expected:.7g}, |diff|={abs(got - expected):.3g} > "
            f"{allowed:.3g} allowed"
        )


def _compare(model, inputs, output_names, onnx_path, batches, *, atol, rtol):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: warnings would spam a command line's output
    session = onnxruntime.InferenceSession(
        onnx_path, options, providers=["CPUExecutionProvider"]
    )
    errors = _Errors()
    for batch in batches:
        expected = keras.tree.flatten(model(_pack(model, batch), training=False))
        feed = {spec.name: array for spec, array in zip(inputs, batch, strict=True)}
        got = session.run(output_names, feed)
        for name, onnx_out, keras_out in zip(output_names, got, expected, strict=True):
            errors.add(name, onnx_out, keras.ops.convert_to_numpy(keras_out), atol=atol, rtol=rtol)
    return errors


def _keras_reference(model):
    # The original model in inference mode, as a function of input arrays in input order.
    def outputs(arrays):
        result = model(_pack(model, arrays), training=False)
        return [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(result)]

    return outputs


# --- small helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def _timed(seconds, step):
    start = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - start


def _write_bytes(path, data):
    # O_EXCL: the name is fresh; mode 0o666 lets the umask decide, as for any new file.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def human_size(size):
    """`size` bytes for people: "776 B", "14.0 MB"."""
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
