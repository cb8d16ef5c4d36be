"""Run an ONNX file in ONNX Runtime and compare it with a Keras model in inference mode.

The check is element-wise, against the scale of the example the element belongs to:

    |onnx − keras| <= atol + rtol·scale,    scale = max |keras| over that example's output

(per output tensor, per example: one row along the batch axis). Float32 rounding in a deep
network leaves errors proportional to the magnitudes the network computes with, not to each
output element: a logit of 7e-4 next to logits of 10 carries the error of the 10s (measured on
MobileNetV2: Keras's own `model(x)` and `model.predict(x)` differ by 3e-5 there). An elementwise
relative check would call that noise a failure, and only the example's scale can judge an
element near zero. The reported `max_rel_error` is the largest |onnx − keras| / scale.

Default tolerances follow the lowest-precision compute dtype among the model's layers (under a
mixed-precision policy Keras computes in float16 or bfloat16, and ONNX Runtime may round
differently); `DEFAULT_TOLERANCES` lists them.

The Keras reference is the model called inside a `tf.function`, as `model.predict` runs it.
(An eager call is not always right: Keras 3.15 adds a channels_first convolution's bias on the
last axis when that axis has as many positions as the layer has filters.)

A value that is NaN or infinite in both outputs (the same non-finite value) counts as agreeing
but is not compared; if no finite value at all could be compared, verification fails: it would
have proven nothing.

The Keras model in its own dtype is not exact either. In a deep network float32 rounding
compounds, and on some models Keras's own float32 result is farther from the exact function than
the tolerance (a random ResNet101 at 32×32: 1.8e-3 from float64 on logits of 7). So when values
disagree beyond the tolerance, the comparison is made once more against the same model computing
in float64 (`float64_reference`), allowing FLOAT32_ERROR_FACTOR times Keras's own float32 error
on the same example: an export as close to the exact function as float32 Keras itself passes; an
export that computes something else still fails. Across the keras.applications zoo ONNX
Runtime's distance from Keras float32 was 1.0–1.7× Keras's own distance from float64, so the
factor 4 leaves room for two float32 implementations and nothing more. Where Keras's own error
passes FLOAT32_ERROR_LIMIT of an example's largest output, the samples leave the model so
ill-conditioned that an allowance that large would prove little (the randomly built
EfficientNetB6 at 32×32: 18 %): the comparison fails and says so.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import keras
import numpy as np
import onnxruntime
import tensorflow as tf

from kerasbn import _keras_compat
from kerasbn.export import signature
from kerasbn.export.errors import ExportError
from kerasbn.export.float64_reference import float64_twin

# compute dtype -> (atol, rtol); float64 and float32 models get float32's.
DEFAULT_TOLERANCES = {
    "float32": (1e-5, 1e-4),
    "float16": (1e-3, 1e-2),  # ~20 units of float16's rounding (2^-11) relative
    "bfloat16": (1e-2, 8e-2),  # ~20 units of bfloat16's rounding (2^-8) relative
}
_BATCH_ROWS = 64  # rows per ONNX Runtime / Keras call: bounds memory for large `samples`
FLOAT32_ERROR_FACTOR = 4.0
FLOAT32_ERROR_LIMIT = 1e-2


@dataclass(frozen=True)
class Verification:
    """How ONNX Runtime's outputs compare with the Keras model's.

    Attributes:
        samples: examples run through both.
        atol, rtol: the tolerance of |onnx − keras| <= atol + rtol·scale (the example's largest
            |keras| output value).
        max_abs_error, max_rel_error: the largest |onnx − keras|, and |onnx − keras| / scale,
            among finite values.
        values: output values compared; `non_finite`: of those, NaN/inf in both (not compared).
        violations: values outside the tolerance.
        message: why it failed ("" when it passed).
        float32_error: None when ONNX Runtime agreed with the Keras model within the tolerance;
            otherwise Keras's own error on these samples, max |keras − keras in float64|, and
            the comparison (errors, violations) is then against the model in float64, each
            value allowed FLOAT32_ERROR_FACTOR times that error of its example besides the
            tolerance. None as well when the float64 model could not be built, or when that
            error passes FLOAT32_ERROR_LIMIT of an example's largest output: the comparison
            with Keras float32 then stands, failed, and its message says why.
    """

    samples: int
    atol: float
    rtol: float
    max_abs_error: float
    max_rel_error: float
    values: int
    non_finite: int
    violations: int
    message: str
    float32_error: float | None = None

    @property
    def passed(self) -> bool:
        return not self.message

    def __str__(self) -> str:
        text = (
            f"verified on {self.samples} samples, ONNX Runtime vs the original Keras model: "
            f"max abs error {self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g} "
            f"(atol={self.atol:g}, rtol={self.rtol:g})"
        )
        if self.float32_error is not None:
            text += (
                f"; against the model in float64, beyond the tolerance Keras's own float32 error "
                f"on these samples ({self.float32_error:.3g}) × {FLOAT32_ERROR_FACTOR:g} allowed"
            )
        if self.non_finite:
            text += f"; {self.non_finite} of {self.values} values NaN or inf in both, not compared"
        return text if self.passed else f"{text}\nFAILED: {self.message}"


def default_tolerance(model):
    """(atol, rtol) for `model`: those of the lowest-precision compute dtype of its layers."""
    dtypes = {
        getattr(layer, "compute_dtype", None)
        for layer in [model, *_keras_compat.sublayers(model)]
    }
    for dtype in ("bfloat16", "float16"):
        if dtype in dtypes:
            return DEFAULT_TOLERANCES[dtype]
    return DEFAULT_TOLERANCES["float32"]


def check_tolerance(atol, rtol):
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            0 <= value < math.inf
        ):
            raise ValueError(
                f"`{name}` must be a finite number >= 0 or None. Received: {name}={value!r}"
            )


def resolve_tolerance(model, atol, rtol):
    """`atol` and `rtol` as floats, each taken from `default_tolerance(model)` when None."""
    check_tolerance(atol, rtol)
    default_atol, default_rtol = default_tolerance(model)
    return (
        float(default_atol if atol is None else atol),
        float(default_rtol if rtol is None else rtol),
    )


def verify(model, onnx_path, samples=None, *, random_samples=None, atol=None, rtol=None):
    """Compare the ONNX file `onnx_path` in ONNX Runtime with `model` in inference mode.

    Args:
        model: the Keras model the file should reproduce.
        onnx_path: an ONNX file whose inputs and outputs are named as `kerasbn.export.to_onnx`
            names them (after the model's input and output layers).
        samples: inputs to compare on: an array, a list in the order of `model.inputs`, or a
            dict by input name; batch first.
        random_samples: standard-normal examples to compare on besides `samples`; None: 8
            without `samples`, none with them.
        atol, rtol: the tolerance; None takes `default_tolerance(model)`.

    Returns:
        A `Verification`; `passed` says whether every value is within the tolerance.

    Raises:
        TypeError, ValueError: bad arguments, before anything runs.
        ExportError: ONNX Runtime cannot load or run the file.
    """
    signature.check_model(model)
    atol, rtol = resolve_tolerance(model, atol, rtol)
    specs = signature.input_specs(model)
    batches = signature.example_batches(specs, samples, random_samples)
    if not batches:
        raise ValueError(
            "Verification needs examples: pass `samples` or a positive `random_samples`. "
            f"Received: samples=None, random_samples={random_samples!r}"
        )
    return compare(model, onnx_path, batches, atol=atol, rtol=rtol)


def compare(model, onnx_path, batches, *, atol, rtol):
    """`verify` on checked arguments: `batches` from `signature.example_batches`."""
    specs = signature.input_specs(model)
    names = signature.output_names(model)
    session = _session(onnx_path, specs, names)
    reference = keras_reference(model, specs)
    errors = _Errors()
    for rows, source, start in _row_blocks(batches):
        expected = [np.asarray(t) for t in reference(*rows)]
        for name, got, keras_out in zip(names, _run(session, specs, names, rows), expected,
                                        strict=True):
            errors.add(name, got, keras_out, atol=atol, rtol=rtol, source=source,
                       first_row=start)
    float32_error = None
    if errors.worst is not None and not errors.shape_mismatch:
        errors, float32_error = _against_float64(
            model, session, specs, names, batches, reference, errors, atol=atol, rtol=rtol
        )
    return Verification(
        samples=sum(len(batch) for batch in batches),
        atol=atol,
        rtol=rtol,
        max_abs_error=errors.max_abs,
        max_rel_error=errors.max_rel,
        values=errors.elements,
        non_finite=errors.non_finite,
        violations=errors.violations,
        message=errors.message(atol=atol, rtol=rtol),
        float32_error=float32_error,
    )


def _row_blocks(batches):
    """(rows, batch source, first row) of every batch, _BATCH_ROWS rows at a time."""
    for batch in batches:
        for start in range(0, len(batch), _BATCH_ROWS):
            rows = [array[start : start + _BATCH_ROWS] for array in batch.arrays]
            yield rows, batch.source, start


def _run(session, specs, names, rows):
    feed = {spec.name: array for spec, array in zip(specs, rows, strict=True)}
    try:
        return session.run(names, feed)
    except Exception as error:  # noqa: BLE001  (ONNX Runtime raises its own kinds)
        raise ExportError(f"ONNX Runtime could not run the exported model: {error}") from error


def _against_float64(model, session, specs, names, batches, reference, failed, *, atol, rtol):
    """(errors, Keras's float32 error) of ONNX Runtime against `model` computing in float64,
    each value allowed FLOAT32_ERROR_FACTOR × Keras's float32 error on its example besides the
    tolerance; (`failed`, None) when no float64 model can be built."""
    try:
        twin = float64_twin(model)
    except Exception as error:  # noqa: BLE001  (from_config raises whatever a layer raises)
        failed.note = (
            "a float64 copy of the model, to measure Keras's own float32 error, could not be "
            f"built: {type(error).__name__}: {error}"
        )
        return failed, None
    float64_specs = [
        dataclasses.replace(spec, dtype="float64") if "float" in spec.dtype else spec
        for spec in specs
    ]
    exact = keras_reference(twin, float64_specs)
    errors = _Errors(
        note=f"compared with the model computing in float64 (keras= is that value), allowing "
        f"{FLOAT32_ERROR_FACTOR:g}× Keras's own float32 error on each example besides the tolerance"
    )
    float32_error = worst_relative = 0.0
    # ONNX Runtime and Keras float32 run again rather than keep the first pass's outputs: only
    # a failed comparison gets here, and large `samples` would otherwise be held whole.
    for rows, source, start in _row_blocks(batches):
        rows64 = [np.asarray(r, dtype=s.dtype) for r, s in zip(rows, float64_specs, strict=True)]
        outputs = zip(names, _run(session, specs, names, rows), reference(*rows),
                      exact(*rows64), strict=True)
        for name, got, keras_out, exact_out in outputs:
            keras_out, exact_out = np.asarray(keras_out, np.float64), np.asarray(exact_out)
            with np.errstate(invalid="ignore"):
                own = np.abs(keras_out - exact_out)
            own = np.where(np.isfinite(own), own, 0.0)
            float32_error = max(float32_error, float(own.max(initial=0.0)))
            scale = _output_scale(exact_out)
            with np.errstate(divide="ignore", invalid="ignore"):
                relative = np.where(own > 0, own / scale, 0.0)
            worst_relative = max(worst_relative, float(relative.max(initial=0.0)))
            errors.add(name, got, exact_out, atol=atol, rtol=rtol, source=source,
                       first_row=start, allowance=FLOAT32_ERROR_FACTOR * _example_scale(own))
    if worst_relative > FLOAT32_ERROR_LIMIT:
        failed.note = (
            f"Keras's own float32 output is up to {worst_relative:.2g} of an example's largest "
            f"output away from the same model in float64 ({float32_error:.3g}), above "
            f"{FLOAT32_ERROR_LIMIT:g}: on these samples the model is too ill-conditioned for "
            "any float32 file to be checked; verify on samples where it is not (real inputs)"
        )
        return failed, None
    return errors, float32_error


def _session(onnx_path, specs, output_names):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: warnings would spam a command line's output
    try:
        session = onnxruntime.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # noqa: BLE001  (as above)
        raise ExportError(f"ONNX Runtime could not load the exported model: {error}") from error
    graph_inputs = sorted(i.name for i in session.get_inputs())
    model_inputs = sorted(spec.name for spec in specs)
    if graph_inputs != model_inputs:
        raise ExportError(
            "The ONNX graph has other inputs than the Keras model: inputs the model does not "
            f"have: {sorted(set(graph_inputs) - set(model_inputs))}; model inputs it lacks: "
            f"{sorted(set(model_inputs) - set(graph_inputs))}"
        )
    missing = sorted(set(output_names) - {o.name for o in session.get_outputs()})
    if missing:
        raise ExportError(f"The ONNX graph lacks the model outputs {missing}")
    return session


def keras_reference(model, specs):
    """`model` in inference mode as `model.predict` runs it: a function of arrays (in the order
    of `specs`) returning the flat list of its outputs. The int8 check uses it too."""
    tensor_specs = [tf.TensorSpec((None, *s.shape[1:]), s.dtype) for s in specs]

    @tf.function(input_signature=tensor_specs, autograph=False, reduce_retracing=True)
    def call(*tensors):
        return keras.tree.flatten(model(signature.pack(model, list(tensors)), training=False))

    return call


def _output_scale(values):
    """Each element's example scale in `values`, non-finite values counting as 0."""
    return _example_scale(np.where(np.isfinite(values), np.abs(values), 0.0))


def _example_scale(magnitude):
    """Each element's example scale: the largest magnitude in its row along the batch axis."""
    if magnitude.ndim < 2:
        return magnitude  # one value per example
    axes = tuple(range(1, magnitude.ndim))
    return np.broadcast_to(magnitude.max(axis=axes, keepdims=True), magnitude.shape)


@dataclass
class _Errors:
    """The running maxima of a comparison and its worst violation of the tolerance."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    violations: int = 0
    elements: int = 0
    non_finite: int = 0
    # (excess, output name, (batch source, row, *index), onnx value, keras value, allowed)
    worst: tuple | None = None
    shape_mismatch: str | None = None
    note: str = ""  # how the comparison was made, when not as the module describes

    def add(self, name, got, expected, *, atol, rtol, source="samples", first_row=0,
            allowance=0.0):
        """Compare one output of rows `first_row`, … of the `source` batch; `allowance` (per
        element, or a number) is allowed besides the tolerance."""
        got = np.asarray(got, dtype=np.float64)
        expected = np.asarray(expected, dtype=np.float64)
        if got.shape != expected.shape:
            self.shape_mismatch = f"output {name!r}: onnx shape {got.shape}, keras {expected.shape}"
            return
        with np.errstate(invalid="ignore"):  # inf - inf: judged as non-finite below
            difference = np.abs(got - expected)
        both_finite = np.isfinite(got) & np.isfinite(expected)
        scale = _output_scale(expected)
        allowed = atol + rtol * scale + allowance
        if both_finite.any():
            self.max_abs = max(self.max_abs, float(difference[both_finite].max()))
            positive = both_finite & (scale > 0)
            if positive.any():
                self.max_rel = max(
                    self.max_rel, float((difference[positive] / scale[positive]).max())
                )
        same_non_finite = ~both_finite & ((got == expected) | (np.isnan(got) & np.isnan(expected)))
        bad = ~same_non_finite & ~(both_finite & (difference <= allowed))
        self.elements += got.size
        self.non_finite += int(same_non_finite.sum())
        self.violations += int(bad.sum())
        if bad.any():
            # How far past its allowance each violation is; non-finite ones count as infinite.
            excess = np.where(bad & both_finite, difference / allowed, -np.inf)
            excess[bad & ~both_finite] = np.inf
            index = np.unravel_index(int(np.argmax(excess)), excess.shape)
            if self.worst is None or excess[index] > self.worst[0]:
                where = (source, first_row + int(index[0]), *map(int, index[1:]))
                self.worst = (
                    float(excess[index]), name, where, got[index], expected[index], allowed[index]
                )

    def message(self, *, atol, rtol):
        """Why the comparison failed, or "" when it passed."""
        if self.shape_mismatch:
            return f"ONNX Runtime and Keras disagree on a shape: {self.shape_mismatch}"
        if self.worst is not None:
            _, name, (source, *index), got, expected, allowed = self.worst
            message = (
                f"ONNX Runtime disagrees with the original Keras model on {self.violations} of "
                f"{self.elements} output values: max abs error {self.max_abs:.3g}, max rel error "
                f"{self.max_rel:.3g}, tolerance |onnx - keras| <= atol + rtol*max|keras| per "
                f"example with atol={atol:g}, rtol={rtol:g}. Worst: output {name!r} at "
                f"{tuple(index)} of the {source} inputs: onnx={got:.7g}, keras={expected:.7g}, "
                f"|diff|={abs(got - expected):.3g} > {allowed:.3g} allowed"
            )
            if self.note:
                message += f" ({self.note})"
            if source == "random":
                message += (
                    ". The worst is on a random standard-normal input: if the model expects "
                    "inputs in another range (pixels in 0-255, say), verify on real `samples` "
                    "instead (`--samples-file`), where float32 is meaningful"
                )
            return message
        if self.non_finite == self.elements:
            return (
                f"every one of the {self.elements} output values is NaN or infinite in Keras "
                "and ONNX Runtime alike, so nothing could be compared; pass `samples` on which "
                "the model gives finite outputs"
            )
        return ""
