"""The errors kerasbn.export raises when a model was read but could not be exported."""


class ExportError(RuntimeError):
    """The export failed: conversion, the ONNX graph, or ONNX Runtime; nothing was written."""


class VerificationError(ExportError):
    """ONNX Runtime and the original Keras model disagree beyond the tolerance.

    Attributes:
        report: the `ExportReport` of the export that failed (its file was not written).
    """

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report
