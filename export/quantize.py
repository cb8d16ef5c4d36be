"""Int8 ONNX: calibrate, quantize and check a float32 export whose BatchNormalization is folded.

    float32 ONNX ──quant_pre_process──► ORT's basic graph optimizations + ONNX shape inference
                 ──quantize_static──► int8 ONNX in QDQ format (int8 per-channel weights,
                                      uint8 activations, ranges calibrated on `calibration`)
                 ──ONNX Runtime vs the original float Keras model──► top-1 agreement, errors

Why fold first: ONNX Runtime quantizes a BatchNormalization only where it has been merged into
the Conv or Gemm before it. A BN left in the graph as a per-channel Mul + Add (what tf2onnx
makes of a BN after a Dense or a depthwise conv that nothing merged) stays in float between two
quantized ops: it costs a Dequantize/Quantize pair around it and keeps the float multiply-add.
`QuantizedStructure.multiply_adds` counts what is left of those; after `fold_batchnorm` it is 0
for every BN that was folded. (ONNX Runtime 1.32's pre-processing itself merges the Mul + Add of
a BN after a depthwise conv into the Conv; the one after a Dense it leaves, and its CPU provider
then runs it as QLinearMul + QLinearAdd: two more ops, each rounding to 8 bits once more.)

The quantization (ONNX Runtime's guidance for x86-64 CPUs; ARM runs it too):
    * QDQ format: QuantizeLinear/DequantizeLinear around the float ops; ONNX Runtime's CPU
      provider fuses DequantizeLinear → Conv → QuantizeLinear into QLinearConv (likewise Gemm,
      MatMul), which is where int8 speed comes from.
    * weights int8, symmetric, one scale per output channel (`per_channel=True`): folding
      multiplies each output channel by its own γ/σ, so per-tensor scales would crush the
      channels with small γ/σ to a few levels;
    * activations uint8 with a zero point, one range per tensor, taken from the calibration data.

Calibration methods (`calibration_method`; how an activation's range is chosen from the values
it takes on the calibration data):
    "minmax"      the smallest and largest value seen (the default: exact for the data seen and
                  the fastest; one outlier widens the range for all values);
    "entropy"     the range whose 8-bit histogram loses the least information (smallest KL
                  divergence to the float histogram); clips rare outliers;
    "percentile"  the range holding 99.999% of the values seen; clips the rest.

Verification compares ONNX Runtime on the int8 file with the ORIGINAL float Keras model:
    * top-1 agreement: the share of examples whose argmax agrees, over the classifier-shaped
      outputs (rank 2, at least 2 classes); it must be >= `min_agreement` (default 0.99);
    * max and mean |int8 − keras| over all outputs (reported: int8 errors scale with each
      output's range, so no single tolerance fits every model);
    * every output finite.
A model without a classifier-shaped output is checked for finite outputs only.

Symbolic shape inference is skipped (`skip_symbolic_shape=True`), so `sympy` is not needed:
it resolves symbolic dimensions (transformer-style reshapes of dynamic shapes). tf2onnx exports
of Keras models have static shapes except the batch dimension, which ONNX's own shape inference
(still run) propagates; tests check that every Conv/Gemm/MatMul of the models we export is
quantized, which needs their input shapes known.
"""

from __future__ import annotations

import numbers
import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from kerasbn.export.calibration import calibration_feeds, example_count
from kerasbn.export.errors import ExportError

QUANTIZE_MODES = ("int8",)
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
DEFAULT_CALIBRATION_SAMPLES = 256
DEFAULT_MIN_AGREEMENT = 0.99
# The ops that carry the weights: quantized, they run as QLinearConv / QGemm / MatMulInteger.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# --- arguments -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8Plan:
    """Everything an int8 export needs, checked and read before any conversion starts.

    Attributes:
        calibration: ONNX feed dicts (input name → float array, batch first), at most
            `calibration.BATCH` examples each (`calibration.calibration_feeds`).
        verification: feed dicts to verify on: `samples` when given, else `calibration`; None
            when verification is off.
        method: a key of `CALIBRATION_METHODS`.
        min_agreement: the top-1 agreement verification requires, in [0, 1].
    """

    calibration: tuple
    verification: tuple | None
    method: str
    min_agreement: float

    def quantize(self, proto, reference, output_names):
        """The int8 `ModelProto` of `proto` and its `QuantizationReport`.

        Args:
            proto: the float32 ONNX model (BN folded).
            reference: the float model as a function of input arrays (in input order)
                returning its outputs (in output order), as `verification.keras_reference`
                makes it; what int8 is checked against.
            output_names: the ONNX output names, in the order `reference` returns them.
        """
        quantized = quantize_model(proto, self.calibration, method=self.method)
        check = None
        if self.verification is not None:
            check = compare(quantized.SerializeToString(), reference, output_names,
                            self.verification)
        return quantized, QuantizationReport(
            method=self.method,
            calibration_samples=example_count(self.calibration),
            float_file_size=proto.ByteSize(),
            structure=quantized_structure(quantized),
            check=check,
            min_agreement=self.min_agreement,
        )


def plan(quantize, *, calibration, calibration_method, calibration_samples, min_agreement,
         samples, verify, specs):
    """Check the int8 arguments of `to_onnx` and read the data; None when `quantize` is None.

    `specs` are the model's `signature.InputSpec`s.

    Raises:
        ValueError: a bad argument, `calibration` without `quantize`, or no `calibration`.
        TypeError: `calibration` or `samples` of a kind that is not data.
        CalibrationError: data that does not fit the model's inputs, or holds no examples.
    """
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(
            f"`quantize` must be None or one of {QUANTIZE_MODES}. Received: quantize={quantize!r}"
        )
    if calibration_method not in CALIBRATION_METHODS:
        raise ValueError(
            f"`calibration_method` must be one of {tuple(CALIBRATION_METHODS)}. "
            f"Received: calibration_method={calibration_method!r}"
        )
    _check_count("calibration_samples", calibration_samples)
    if isinstance(min_agreement, bool) or not isinstance(min_agreement, numbers.Real) or not (
        0 <= min_agreement <= 1
    ):
        raise ValueError(
            "`min_agreement` must be a number from 0 to 1. "
            f"Received: min_agreement={min_agreement!r}"
        )
    if quantize is None:
        if calibration is not None:
            raise ValueError(
                "`calibration` is only used by an int8 export: pass quantize='int8' too. "
                f"Received: quantize=None, calibration of type {type(calibration).__name__}"
            )
        return None
    if calibration is None:
        raise ValueError(
            "quantize='int8' needs `calibration`: example inputs (a few hundred, like the data "
            "the model will see) to choose each activation's int8 range. Received: "
            "calibration=None"
        )
    feeds = calibration_feeds(calibration, specs, max_samples=calibration_samples)
    verification = None
    if verify:
        verification = feeds if samples is None else calibration_feeds(
            samples, specs, max_samples=None, name="samples"
        )
    return Int8Plan(tuple(feeds), None if verification is None else tuple(verification),
                    calibration_method, float(min_agreement))


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")


class FeedReader(CalibrationDataReader):
    """ONNX Runtime's calibration interface over a list of feed dicts; `rewind` starts over."""

    def __init__(self, feeds):
        self._feeds = list(feeds)
        self._next = 0

    def get_next(self):
        if self._next == len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def rewind(self):
        self._next = 0

    def __len__(self):
        return len(self._feeds)


# --- quantization --------------------------------------------------------------------------------


def quantize_model(proto, feeds, *, method="minmax"):
    """The int8 QDQ `ModelProto` of the float `proto`, calibrated on `feeds` with `method`.

    ONNX Runtime's tools read and write files, so they work in a private temporary directory.
    `quant_pre_process` gets a file, not the proto: given a proto (ONNX Runtime 1.32) it saves
    the weights as external data it then fails to find.
    """
    initializers = {t.name for t in proto.graph.initializer}
    unfed = [i.name for i in proto.graph.input if i.name not in initializers | set(feeds[0])]
    if unfed:
        # ONNX Runtime would fail deep inside calibration with a less helpful message.
        raise ExportError(
            "The float32 ONNX model has inputs the calibration data does not feed (constants the "
            f"converter left as graph inputs?): {unfed}. Received: feeds for {sorted(feeds[0])}"
        )
    with tempfile.TemporaryDirectory(prefix="kerasbn-int8-") as directory:
        source = os.path.join(directory, "float32.onnx")
        onnx.save(proto, source)
        prepared = os.path.join(directory, "prepared.onnx")
        quantized = os.path.join(directory, "int8.onnx")
        try:
            quant_pre_process(source, prepared, skip_symbolic_shape=True)
            quantize_static(
                prepared,
                quantized,
                FeedReader(feeds),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CALIBRATION_METHODS[method],
                calibration_providers=["CPUExecutionProvider"],
            )
        except Exception as error:  # noqa: BLE001  (ONNX Runtime raises many kinds)
            # A failed export, not a bad argument (those were checked before converting).
            raise ExportError(f"ONNX Runtime could not quantize the model: {error}") from error
        result = onnx.load(quantized)
    onnx.checker.check_model(result, full_check=True)
    return result


# --- structure -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedStructure:
    """What runs in int8 in a (QDQ) ONNX model, counted from its graph.

    Attributes:
        quantized: op type → how many of its nodes are quantized: their weight is an int8
            initializer through DequantizeLinear and their data input comes from
            DequantizeLinear, so ONNX Runtime runs them as QLinearConv / QGemm / MatMulInteger.
        totals: op type → how many nodes of that type, for the `WEIGHTED_OPS`.
        multiply_adds: Mul and Add nodes with one constant operand (an initializer, directly
            or through DequantizeLinear): multiply-adds by a constant such as an unfolded BN,
            left out of the weighted ops (float, or QLinearMul/QLinearAdd once ONNX Runtime
            fuses their QDQ).
        node_count: nodes in the graph.
    """

    quantized: Mapping[str, int]
    totals: Mapping[str, int]
    multiply_adds: int
    node_count: int

    def __str__(self):
        ops = ", ".join(
            f"{op} {self.quantized.get(op, 0)}/{count}" for op, count in self.totals.items()
        ) or "no Conv/Gemm/MatMul"
        return (
            f"quantized (int8 weights, QDQ inputs): {ops}; multiply-adds left outside them "
            f"(Mul/Add by a constant, e.g. an unfolded BN): {self.multiply_adds}"
        )


def quantized_structure(proto) -> QuantizedStructure:
    graph = proto.graph
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producers = {o: n for n in graph.node for o in n.output}

    def dequantized(name, *, constant):
        node = producers.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return False
        return (node.input[0] in constants) == constant

    def is_constant(name):
        return name in constants or dequantized(name, constant=True)

    totals, quantized = Counter(), Counter()
    multiply_adds = 0
    for node in graph.node:
        if node.op_type in WEIGHTED_OPS:
            totals[node.op_type] += 1
            if len(node.input) >= 2 and dequantized(node.input[0], constant=False) and (
                dequantized(node.input[1], constant=True)
            ):
                quantized[node.op_type] += 1
        elif node.op_type in ("Mul", "Add") and sum(map(is_constant, node.input[:2])) == 1:
            multiply_adds += 1
    return QuantizedStructure(dict(quantized), dict(sorted(totals.items())), multiply_adds,
                              len(graph.node))


# --- verification --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8Check:
    """ONNX Runtime on the int8 model vs the float Keras model.

    Attributes:
        samples: examples compared.
        agreement: share of examples whose argmax agrees, over the classifier-shaped outputs
            (rank 2, >= 2 classes); None when there is none.
        max_abs_error, mean_abs_error: of |int8 − keras| over all output values.
        finite: every int8 output value is finite.
    """

    samples: int
    agreement: float | None
    max_abs_error: float
    mean_abs_error: float
    finite: bool


def compare(model_bytes, reference, output_names, feeds) -> Int8Check:
    """Run the serialized ONNX model and `reference` on `feeds`; their agreement and errors."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(model_bytes, options,
                                           providers=["CPUExecutionProvider"])
    agree = classified = values = samples = 0
    max_abs = total_abs = 0.0
    finite = True
    for feed in feeds:
        got = session.run(output_names, feed)
        expected = reference(*feed.values())
        samples += len(next(iter(feed.values())))
        for onnx_out, keras_out in zip(got, expected, strict=True):
            onnx_out = np.asarray(onnx_out, dtype=np.float64)
            keras_out = np.asarray(keras_out, dtype=np.float64)
            finite = finite and bool(np.isfinite(onnx_out).all())
            difference = np.abs(onnx_out - keras_out)
            max_abs = max(max_abs, float(np.nanmax(difference, initial=0.0)))
            total_abs += float(np.nansum(difference))
            values += difference.size
            if keras_out.ndim == 2 and keras_out.shape[1] >= 2:
                agree += int((onnx_out.argmax(1) == keras_out.argmax(1)).sum())
                classified += len(keras_out)
    return Int8Check(
        samples=samples,
        agreement=agree / classified if classified else None,
        max_abs_error=max_abs,
        mean_abs_error=total_abs / max(values, 1),
        finite=finite,
    )


@dataclass(frozen=True)
class QuantizationReport:
    """What the int8 step did, and how well the int8 model agrees with the float Keras model.

    Attributes:
        method: the calibration method.
        calibration_samples: examples the ranges were calibrated on.
        float_file_size: bytes of the float32 ONNX model it was made from.
        structure: `QuantizedStructure` of the int8 model.
        check: `Int8Check` against the original Keras model; None when not verified.
        min_agreement: the top-1 agreement required.
    """

    method: str
    calibration_samples: int
    float_file_size: int
    structure: QuantizedStructure
    check: Int8Check | None
    min_agreement: float

    @property
    def passed(self) -> bool:
        """Not verified, or finite outputs with enough top-1 agreement."""
        check = self.check
        return check is None or check.finite and (
            check.agreement is None or check.agreement >= self.min_agreement
        )

    def failure(self) -> str:
        """Why verification failed, as a sentence with the numbers."""
        check = self.check
        if not check.finite:
            return "the int8 model gives NaN or infinite outputs where Keras does not"
        return (
            f"int8 top-1 agreement with the float Keras model is {check.agreement:.2%} on "
            f"{check.samples} samples, below min_agreement={self.min_agreement:g} (max abs "
            f"error {check.max_abs_error:.3g}, mean {check.mean_abs_error:.3g}); try more or "
            "more representative calibration data, or another calibration_method"
        )

    def lines(self, file_size):
        """Report lines; `file_size` is the int8 file's size in bytes."""
        lines = [
            f"int8 (QDQ, per-channel weights), calibrated on {self.calibration_samples} "
            f"samples with {self.method!r}: file {_kilobytes(file_size)} vs float32 "
            f"{_kilobytes(self.float_file_size)} ({file_size / self.float_file_size:.2f}x)",
            str(self.structure),
        ]
        check = self.check
        if check is None:
            lines.append("int8 not verified (verify=False)")
        else:
            agreement = "no classifier-shaped output" if check.agreement is None else (
                f"top-1 agreement {check.agreement:.2%} (min {self.min_agreement:.2%})"
            )
            lines.append(
                f"verified on {check.samples} samples, int8 ONNX Runtime vs the original float "
                f"Keras model: {agreement}, max abs error {check.max_abs_error:.3g}, mean abs "
                f"error {check.mean_abs_error:.3g}"
            )
        return lines


def _kilobytes(size):
    return f"{size / 1000:.1f} kB"
