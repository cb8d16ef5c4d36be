"""Helpers shared by the test modules: walking models, giving BN real statistics, reading ONNX."""


import inspect
import os
from collections import Counter

import keras
import onnx
import onnxruntime
import pytest

import kerasbn
from kerasbn import _keras_compat

BN_TYPES = (kerasbn.BatchNormalization, keras.layers.BatchNormalization)
# Keras added Batch Renormalization back in 3.14; on Python 3.10, pip installs Keras 3.12.
KERAS_HAS_RENORM = "renorm" in inspect.signature(keras.layers.BatchNormalization).parameters


def keras_batch_normalization(**kwargs):
    """Keras's own layer, to compare with; skips the test where this Keras lacks `renorm`."""
    if kwargs.get("renorm") and not KERAS_HAS_RENORM:
        pytest.skip(f"Keras {keras.__version__} has no Batch Renormalization (3.14+ has)")
    return keras.layers.BatchNormalization(**kwargs)


def tracked_layers(model):
    """`model` and every layer it tracks below itself, subclassed parts included."""
    return [model, *_keras_compat.sublayers(model)]


def all_layers(model):
    """Every layer of `model` and its nested models, each once."""
    found = {}
    for layer in model.layers:
        found[id(layer)] = layer
        if isinstance(layer, keras.Model):
            found.update((id(inner), inner) for inner in all_layers(layer))
    return list(found.values())


def bn_layers(model):
    return [layer for layer in all_layers(model) if isinstance(layer, BN_TYPES)]


def randomize_bn(model, rng):
    """Non-trivial statistics and parameters: γ of both signs, means off zero, var ≠ 1."""
    for bn in bn_layers(model):
        shape = tuple(bn.moving_mean.shape)
        if bn.gamma is not None:
            bn.gamma.assign(rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape))
        if bn.beta is not None:
            bn.beta.assign(rng.normal(0.0, 0.5, shape))
        bn.moving_mean.assign(rng.normal(0.0, 0.5, shape))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, shape))


def operators(path_or_proto):
    proto = onnx.load(path_or_proto) if isinstance(path_or_proto, (str, os.PathLike)) else (
        path_or_proto
    )
    return Counter(node.op_type for node in proto.graph.node)


def run_onnx(path, *arrays):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, arrays, strict=True)))


def randomize_biases(model, rng):
    # Zero biases would let tf2onnx drop their Add, so a reference model needs real ones.
    for layer in model.layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0.0, 0.5, tuple(layer.bias.shape)))


class Subclassed(keras.Model):
    """A model whose graph Keras cannot show: one Dense called in `call`."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


def fold_counts(report):
    """(folded, refused, kept) counts of a FoldReport or an ExportReport."""
    return len(report.folded), len(report.refused), len(report.kept)
