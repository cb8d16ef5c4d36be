"""Export a Keras model to ONNX with its BatchNormalization folded, and verify the file.

    model ──fold_batchnorm──► folded model ──convert (trace, freeze, tf2onnx)──► ONNX
    ONNX ──onnx.checker──► temporary file beside `path`
         ──ONNX Runtime on that file vs the ORIGINAL model in inference mode──► os.replace

Every argument and the output path are checked before any work starts; nothing replaces `path`
without the verification asked for (see `kerasbn.export.files` and `kerasbn.export.verification`).

Node counts. tf2onnx lowers an inference BN to Mul + Add, and merges those into a channels_last
Conv2D, Conv3D or SeparableConv2D itself (measured with tf2onnx 1.17): there folding changes
nothing in the file. Folding removes the Mul + Add where tf2onnx cannot: after Dense, Conv1D,
channels_first convolutions, depthwise, transposed convolutions and SeparableConv1D. To report
both counts, a fold that removed a BN costs one more conversion (of the unfolded model, in
memory, while the folded one's ONNX model is held: each conversion frees what it made, see
`kerasbn.export.tf2onnx_steps`); `baseline=False` skips it. Every conversion of a model gives
the same file, so the two counts compare like with like.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx

from kerasbn.export import files, signature
from kerasbn.export import quantize as _int8
from kerasbn.export.convert import check_opset, convert
from kerasbn.export.errors import VerificationError
from kerasbn.export.folding import fold_batchnorm
from kerasbn.export.report import FoldReport
from kerasbn.export.verification import (
    Verification,
    compare,
    keras_reference,
    resolve_tolerance,
)


@dataclass(frozen=True)
class ExportReport:
    """What `to_onnx` wrote and how well it agrees with the original model.

    Attributes:
        path: the ONNX file.
        opset: the ONNX opset it uses.
        node_count: ONNX nodes in the file.
        float_node_count: ONNX nodes of the float32 export (before int8 quantization, which
            adds QuantizeLinear/DequantizeLinear pairs); `node_count` for a float32 file.
        unfolded_node_count: ONNX nodes tf2onnx gives for the original, unfolded model in float32
            (equal to `float_node_count` when nothing was folded; None when `baseline=False`
            skipped it).
        fold: the `FoldReport`, or None when `fold=False`.
        verification: the `kerasbn.export.verification.Verification` (None when not verified);
            `verified_samples`, `max_abs_error` and `max_rel_error` read it.
        atol, rtol: the tolerance of the check |onnx − keras| <= atol + rtol·scale, where
            scale is the example's largest |keras| output value (`kerasbn.export.verification`).
        file_size: bytes of the ONNX file.
        quantization: the `kerasbn.export.quantize.QuantizationReport` of an int8 export
            (structure, sizes, agreement with Keras); None for float32.
        seconds: wall time of each step ("fold", "convert", "baseline", "quantize", "verify").
    """

    path: str
    opset: int
    node_count: int
    float_node_count: int
    unfolded_node_count: int | None
    fold: FoldReport | None
    verification: Verification | None
    atol: float
    rtol: float
    file_size: int
    quantization: _int8.QuantizationReport | None = None
    seconds: Mapping[str, float] = field(default_factory=dict, compare=False)

    @property
    def folded(self) -> tuple:
        """The fold records of the BN layers folded away (as `FoldReport.folded`)."""
        return self.fold.folded if self.fold else ()

    @property
    def refused(self) -> tuple:
        return self.fold.refused if self.fold else ()

    @property
    def kept(self) -> tuple:
        return self.fold.kept if self.fold else ()

    @property
    def verified_samples(self) -> int:
        if self.quantization is not None:
            return self.quantization.check.samples if self.quantization.check else 0
        return self.verification.samples if self.verification else 0

    @property
    def max_abs_error(self) -> float | None:
        return self.verification.max_abs_error if self.verification else None

    @property
    def max_rel_error(self) -> float | None:
        return self.verification.max_rel_error if self.verification else None

    def __str__(self) -> str:
        unfolded = "not converted" if self.unfolded_node_count is None else self.unfolded_node_count
        nodes = f"{self.node_count} ONNX nodes (unfolded export: {unfolded})"
        if self.quantization is not None:
            nodes = (
                f"{self.node_count} ONNX nodes int8 (float32 export: {self.float_node_count}, "
                f"unfolded: {unfolded})"
            )
        lines = [f"{self.path}: {files.human_size(self.file_size)}, opset {self.opset}, {nodes}"]
        if self.fold is None:
            lines.append("BatchNormalization: not folded (fold=False)")
        else:
            lines += self.fold.lines()
        if self.quantization is not None:
            lines += self.quantization.lines(self.file_size)
        else:
            lines.append(
                str(self.verification) if self.verification else "not verified (verify=False)"
            )
        return "\n".join(lines)


def to_onnx(
    model,
    path,
    *,
    opset=17,
    fold=True,
    verify=True,
    samples=None,
    atol=None,
    rtol=None,
    random_samples=None,
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
        path: where to write the .onnx file, in an existing writable directory. It is replaced
            only by a file that passed `onnx.checker` and (with `verify`) verification; on
            failure or interruption a previous file stays as it was and no temporary is left.
        opset: ONNX opset, 13 to 18.
        fold: fold BN into neighbouring layers first (`kerasbn.export.fold_batchnorm`).
        verify: run the written file in ONNX Runtime and compare with the original model in
            inference mode; raise `VerificationError` when |onnx − keras| > atol + rtol·scale
            anywhere (scale: the example's largest |keras| output value).
        samples: real inputs to verify on as well: an array (one input), a list of arrays in
            the order of `model.inputs`, or a dict from input name to array; batch first.
        atol, rtol: the verification tolerance, >= 0; None takes the default for the model's
            compute dtype (`kerasbn.export.verification.DEFAULT_TOLERANCES`: 1e-5 and 1e-4 for
            float32, 1e-3 and 1e-2 under mixed_float16, 1e-2 and 8e-2 under mixed_bfloat16).
        random_samples: how many random standard-normal examples to verify on besides
            `samples`; None (the default): 8 without `samples`, none with them. Their shapes
            come from the model's inputs, or from `samples` where the model leaves a dimension
            unknown.
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
        TypeError, ValueError: a bad argument or path, or a model without defined inputs;
            before anything runs (`kerasbn.export.CalibrationError`, a ValueError, for
            int8 calibration data that does not fit the model).
        ExportError: the conversion or ONNX Runtime failed; nothing is written.
        onnx.checker.ValidationError: tf2onnx produced an invalid model; nothing is written.
        VerificationError: ONNX Runtime disagrees with Keras; nothing is written.
    """
    signature.check_model(model)
    path = files.check_output_path(path)
    check_opset(opset)
    for name, value in (("fold", fold), ("verify", verify), ("baseline", baseline)):
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be True or False. Received: {name}={value!r}")
    atol, rtol = resolve_tolerance(model, atol, rtol)
    specs = signature.input_specs(model)
    input_names = [spec.name for spec in specs]
    output_names = signature.output_names(model)
    # int8 (kerasbn.export.quantize): its arguments checked and its data read before converting.
    int8 = _int8.plan(
        quantize, calibration=calibration, calibration_method=calibration_method,
        calibration_samples=calibration_samples, min_agreement=min_agreement, samples=samples,
        verify=verify, specs=specs,
    )
    verify_float = verify and int8 is None  # an int8 file is checked by int8.quantize
    batches = signature.example_batches(specs, samples, random_samples) if verify_float else []
    if verify_float and not batches:
        raise ValueError(
            "Verification needs examples: pass `samples` or a positive `random_samples`. "
            f"Received: samples=None, random_samples={random_samples!r}"
        )

    seconds = {}
    with _timed(seconds, "fold"):
        exported, fold_report = fold_batchnorm(model) if fold else (model, None)
    # The file is written first and everything after reads it, so the weights are held about
    # once at a time: the checker and ONNX Runtime load the file themselves (a proto passed to
    # them is serialized once more), and the proto goes as soon as its file exists (an int8
    # export keeps it to quantize).
    with files.atomic_path(path) as temporary:
        with _timed(seconds, "convert"):
            proto = convert(
                exported, opset=opset, input_names=input_names, output_names=output_names
            )
            del exported  # a folded copy of the weights
            float_node_count = unfolded_node_count = len(proto.graph.node)
            _write_model(proto, temporary)
            if int8 is None:
                del proto
            onnx.checker.check_model(temporary, full_check=True)
        if fold_report is not None and fold_report.folded:
            unfolded_node_count = None
            if baseline:
                with _timed(seconds, "baseline"):
                    # Only its count is kept: the proto (the weights once more) goes at once.
                    unfolded_node_count = len(
                        convert(model, opset=opset, output_names=output_names).graph.node
                    )
        quantization = None
        node_count = float_node_count
        if int8 is not None:
            with _timed(seconds, "quantize"):
                proto, quantization = int8.quantize(
                    proto, keras_reference(model, specs), output_names
                )
            node_count = len(proto.graph.node)
            os.unlink(temporary)  # the float32 file: the int8 one takes its place
            _write_model(proto, temporary)
            del proto
        verification = None
        if batches:
            with _timed(seconds, "verify"):
                verification = compare(model, temporary, batches, atol=atol, rtol=rtol)
        report = ExportReport(
            path=path,
            opset=opset,
            node_count=node_count,
            float_node_count=float_node_count,
            unfolded_node_count=unfolded_node_count,
            fold=fold_report,
            verification=verification,
            atol=atol,
            rtol=rtol,
            file_size=os.path.getsize(temporary),
            quantization=quantization,
            seconds=seconds,
        )
        if verification is not None and not verification.passed:
            # Raised inside the block: the temporary file is deleted, `path` left as it was.
            raise VerificationError(verification.message, report)
        if quantization is not None and not quantization.passed:
            raise VerificationError(quantization.failure(), report)
    return report


def _write_model(proto, path):
    """Write `proto` to the new file `path`; its serialized copy is freed on return."""
    files.write_bytes(path, proto.SerializeToString())


@contextlib.contextmanager
def _timed(seconds, step):
    start = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - start
