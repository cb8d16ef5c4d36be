"""The forward pass of Algorithm 2: the model with its BN layers in training mode, reporting.

Algorithm 2 estimates each BN layer's inference statistics from the batch moments it sees in
training, so during the pass every estimated BN layer normalizes with its batch's moments (its
training-mode output: the layers after it see the distribution they saw in training) and
reports them, while every other layer (dropout, noise, ...) runs in inference mode and no
weight changes. All layers are estimated in the same forward pass. The moments come from one
place, `kernel.batch_norm_forward` (kerasbn's training kernel without its backward), for both
layer classes:

- `kerasbn.BatchNormalization` has a documented hook, `reporting_batch_moments`: the model is
  called as it is (`model(x, training=False)`), wherever the layer sits (Sequential,
  Functional, subclassed, nested, wrapped).
- `keras.layers.BatchNormalization` has none, and Keras offers no public way to run one layer
  of a model in training mode while the rest runs in inference mode. So the pass runs the
  model's graph itself, as Keras's Functional runs it (`_keras_compat.run_graph`, probed by
  `tests/test_keras_compat.py`), with each Keras BN call node calling a stand-in layer that
  reads the Keras layer's gamma, beta, axis and epsilon; nested Sequential and Functional
  models are run the same way. Only a graph shows where a layer is called, so a Keras BN that
  a subclassed model or layer calls from its own code cannot be reached: `batch_norm_layers`
  refuses such a model before anything runs and names the layers (kerasbn's layer, which takes
  a Keras BN's config and weights, can stand there). Why not the sub-model
  `keras.Model(model.inputs, [bn.input for bn in layers])`: it computes each BN's input with
  the BN layers before it in inference mode, but Algorithm 2's statistics are of the inputs
  the layer sees in training, after the earlier BN layers normalized with batch moments.
  Nor the earlier mechanism, replacing each layer's `call` on the instance: that patched
  Keras's objects behind its back.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref

import keras
import tensorflow as tf

from kerasbn import _keras_compat, kernel
from kerasbn._axes import normalize_axes, reduction_axes
from kerasbn.layer import BatchNormalization

BATCH_NORM_CLASSES = (BatchNormalization, keras.layers.BatchNormalization)


def batch_norm_layers(model):
    """(to estimate, frozen, never built): every BN layer at any depth, each once.

    Raises `TypeError` for a non-model, `ValueError` for an unbuilt model, a model without a
    trainable built BN layer, or a Keras BN layer the pass cannot reach (see the module).
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a Keras model. Received: model of type {type(model)}")
    if not model.built:
        raise ValueError(
            "`model` must be built (trained, or called on data) before its population "
            f"statistics can be estimated. Received: unbuilt model {model.name!r}"
        )
    # Every layer at any depth, shared ones once, whether or not a graph shows their calls.
    layers = [model, *_keras_compat.sublayers(model)]
    found = [layer for layer in layers if isinstance(layer, BATCH_NORM_CLASSES)]
    estimated = [layer for layer in found if layer.trainable and layer.built]
    frozen = [layer for layer in found if not layer.trainable]
    unbuilt = [layer for layer in found if layer.trainable and not layer.built]
    if not estimated:
        detail = f"only frozen ones ({len(frozen)})" if frozen else "none"
        raise ValueError(
            "`model` has no trainable, built BatchNormalization layer to estimate. Received: "
            f"model {model.name!r} with {detail}"
        )
    _check_keras_layers_reachable(model, estimated)
    return estimated, frozen, unbuilt


def _graph_operations(model):
    """Ids of every operation a graph model's graph calls, into nested graph models."""
    if not _keras_compat.is_runnable_graph(model):
        return set()
    found = set()
    for node in _keras_compat.graph_nodes(model):
        found.add(id(node.operation))
        found |= _graph_operations(node.operation)
    return found


def _check_keras_layers_reachable(model, layers):
    keras_layers = [layer for layer in layers if not isinstance(layer, BatchNormalization)]
    if not keras_layers:
        return
    reached = _graph_operations(model)
    unreachable = [layer.name for layer in keras_layers if id(layer) not in reached]
    if unreachable:
        raise ValueError(
            "A keras.layers.BatchNormalization can be estimated only where a Sequential or "
            "Functional graph calls it: Keras has no public way to run one layer that a "
            "subclassed model or layer calls from its own code in training mode alone. Use "
            "kerasbn.BatchNormalization there (it takes a Keras BN's config and weights: "
            "`kerasbn.BatchNormalization(**bn.get_config())`, then `set_weights`). Received: "
            f"model {model.name!r} with keras.layers.BatchNormalization {unreachable} outside "
            "its graph"
        )


def _accepts_training(operation):
    return isinstance(operation, keras.layers.Layer) and (
        "training" in inspect.signature(operation.call).parameters
    )


class _KerasBatchNormStandIn(keras.layers.Layer):
    """A `keras.layers.BatchNormalization` in the pass: its training-mode output from kerasbn's
    kernel, its moments reported. A layer, so that Keras hands it the mask and converts its
    input as it does for the Keras layer (same dtype policy); it reads the Keras layer's gamma,
    beta, axis and epsilon and owns no weights."""

    def __init__(self, layer, report):
        super().__init__(dtype=layer.dtype_policy, name=f"{layer.name}_population_pass")
        self.supports_masking = True
        # A weak reference: not tracked as a sublayer, and the stand-in keeps nothing alive.
        self._layer = weakref.ref(layer)
        self._report = report

    def call(self, inputs, mask=None):
        layer = self._layer()
        # As Keras's layer does: integer inputs are computed in float32, float64 stays float64.
        if not inputs.dtype.is_floating:
            inputs = tf.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        dtype = kernel.statistics_dtype(inputs.dtype)
        rank = len(inputs.shape)
        axes = normalize_axes(layer.axis, rank)
        keepdims_shape = [inputs.shape[a] if a in axes else 1 for a in range(rank)]
        gamma = kernel.per_channel(layer.gamma if layer.scale else None, 1.0, keepdims_shape, dtype)
        beta = kernel.per_channel(layer.beta if layer.center else None, 0.0, keepdims_shape, dtype)
        outputs, *moments = kernel.batch_norm_forward(
            inputs, gamma, beta, reduction_axes=reduction_axes(axes, rank),
            epsilon=layer.epsilon, weights=kernel.mask_weights(inputs, mask),
        )
        shape, stored = layer.moving_mean.shape, layer.moving_mean.dtype
        self._report(*(tf.cast(tf.reshape(t, shape), stored) for t in moments))
        return tf.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


def _recorder(records):
    """A `report(mean, variance, count)` that keeps each call's moments in `records`."""

    def report(mean, variance, count):
        records.append((mean, variance, count))

    return report


class ReportingForward:
    """`forward(x)`: one forward pass of `model` in Algorithm 2's mode (module docstring);
    returns, for each of `layers` in order, the (mean, biased variance, count) of each of its
    calls in that pass (a shared layer is called more than once)."""

    def __init__(self, model, layers):
        # Weak: the estimator caches this per model, and must not keep the model alive.
        self._model = weakref.ref(model)
        self._records = [[] for _ in layers]
        reports = [_recorder(records) for records in self._records]
        self._ours = [
            (layer, report)
            for layer, report in zip(layers, reports, strict=True)
            if isinstance(layer, BatchNormalization)
        ]
        self._stand_ins = {
            id(layer): _KerasBatchNormStandIn(layer, report)
            for layer, report in zip(layers, reports, strict=True)
            if not isinstance(layer, BatchNormalization)
        }

    def __call__(self, x):
        for records in self._records:
            records.clear()  # they hold the previous trace's (or eager call's) tensors
        with contextlib.ExitStack() as scopes:
            for layer, report in self._ours:
                scopes.enter_context(layer.reporting_batch_moments(report))
            model = self._model()
            if self._stand_ins:
                self._run_graph(model, x)
            else:
                model(x, training=False)
        return [list(records) for records in self._records]

    def _run_graph(self, model, x):
        return _keras_compat.run_graph(model, x, self._call_operation)

    def _call_operation(self, operation, *args, **kwargs):
        stand_in = self._stand_ins.get(id(operation))
        if stand_in is not None:
            kwargs.pop("training", None)
            return stand_in(*args, **kwargs)
        if _keras_compat.is_runnable_graph(operation):
            return self._run_graph(operation, args[0])
        # As `model(x, training=False)` would: inference mode for every other layer.
        if _accepts_training(operation):
            kwargs["training"] = False
        return operation(*args, **kwargs)
