"""kerasbn.export: fold BatchNormalization into neighbouring layers, export to ONNX.

Public API:
    fold_batchnorm    a new Keras model with inference BN folded away, and a FoldReport
    FoldReport, FoldRecord    what happened to each BN layer, and why
    to_onnx           fold, convert with tf2onnx, verify with ONNX Runtime, write atomically
    ExportReport      what to_onnx wrote: node counts, fold counts, verification errors
    VerificationError ONNX Runtime disagrees with the original model (nothing written)
"""

from kerasbn.export.graph import fold_batchnorm
from kerasbn.export.onnx import ExportReport, VerificationError, to_onnx
from kerasbn.export.report import FoldRecord, FoldReport

__all__ = [
    "ExportReport",
    "FoldRecord",
    "FoldReport",
    "VerificationError",
    "fold_batchnorm",
    "to_onnx",
]
