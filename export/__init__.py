"""kerasbn.export: fold BatchNormalization into neighbouring layers, export to ONNX.

Public API:
    fold_batchnorm    a new Keras model with inference BN folded away, and a FoldReport
    FoldReport, FoldRecord    what happened to each BN layer, and why
    to_onnx           fold, convert with tf2onnx, verify with ONNX Runtime, write atomically
    ExportReport      what to_onnx wrote: node counts, fold records, the verification
    verify            compare any ONNX file in ONNX Runtime with a Keras model
    Verification      what verify found
    ExportError       the export failed (conversion, ONNX graph, ONNX Runtime); nothing written
    VerificationError ONNX Runtime disagrees with the original model; nothing written
    CalibrationError  int8 calibration data that does not fit the model (a ValueError)
"""

from kerasbn.export.calibration import CalibrationError
from kerasbn.export.errors import ExportError, VerificationError
from kerasbn.export.folding import fold_batchnorm
from kerasbn.export.onnx import ExportReport, to_onnx
from kerasbn.export.report import FoldRecord, FoldReport
from kerasbn.export.verification import Verification, verify

__all__ = [
    "CalibrationError",
    "ExportError",
    "ExportReport",
    "FoldRecord",
    "FoldReport",
    "Verification",
    "VerificationError",
    "fold_batchnorm",
    "to_onnx",
    "verify",
]
