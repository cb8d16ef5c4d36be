"""Algorithm 2's running estimate over a pass: accumulators, the per-batch step, the commit.

Each estimated BN layer gets an accumulator apart from the layer, holding the running
`kerasbn.updates.population_update` state (mean, variance, Σ m_B, Σ (m_B − 1)). The step runs
one batch through `population_forward.ReportingForward` and pools every reported call of every
layer into a candidate state; the batch is taken for all layers or for none (so that all are
estimated from the same samples): a layer whose moments are not finite, or have m < 2 (no
unbiased variance), rejects it for every layer. Nothing reaches a layer until `commit`, after
the whole pass succeeded.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
import tensorflow as tf

from kerasbn import updates
from kerasbn.layer import BatchNormalization
from kerasbn.population_data import describe_inputs
from kerasbn.population_forward import ReportingForward


class _Accumulator:
    """One layer's running estimate during a pass, apart from the layer until the commit."""

    def __init__(self, layer):
        self.layer = layer
        shape = tuple(layer.moving_mean.shape)
        self.variables = tuple(
            tf.Variable(tf.zeros(shape, layer.moving_mean.dtype), trainable=False)
            for _ in ("mean", "variance", "count", "dof")
        )

    def reset(self):
        for variable in self.variables:
            variable.assign(tf.zeros_like(variable))

    def read(self):
        return tuple(variable.value() for variable in self.variables)

    def assign_if(self, condition, values):
        for variable, value in zip(self.variables, values, strict=True):
            variable.assign(tf.where(condition, value, variable))


class PopulationPass:
    """The per-batch step for one model and its estimated layers, traced once and reused."""

    def __init__(self, model, layers):
        # A weak reference: this object is cached per model and must not keep it alive.
        self._model = weakref.ref(model)
        self.layer_ids = tuple(id(layer) for layer in layers)
        self.forward = ReportingForward(model, layers)
        self.accumulators = [_Accumulator(layer) for layer in layers]
        run_eagerly = getattr(model, "run_eagerly", False)
        jit_compile = bool(getattr(model, "jit_compile", False))
        # Like Keras's predict: one traced function, retraced at most for a short last batch.
        self.step = self._step if run_eagerly else tf.function(
            self._step, reduce_retracing=True, jit_compile=jit_compile, autograph=False
        )

    def reset(self):
        for accumulator in self.accumulators:
            accumulator.reset()

    def _step(self, x):
        calls = self.forward(x)
        accepted = []
        candidates = []
        for records, accumulator in zip(calls, self.accumulators, strict=True):
            state = accumulator.read()
            for moments in records:
                *state, ok = updates.population_update(*state, *moments)
                accepted.append(ok)
            candidates.append(state)
        # All or nothing per batch: every layer is estimated from the same samples.
        batch_ok = tf.reduce_all(tf.stack(accepted)) if accepted else tf.constant(True)
        # Why a batch is skipped: m < 2 somewhere, or else non-finite statistics.
        counts = [count for records in calls for (_, _, count) in records]
        too_small = tf.reduce_any([tf.reduce_any(c < 2.0) for c in counts]) if counts else False
        for accumulator, state in zip(self.accumulators, candidates, strict=True):
            accumulator.assign_if(batch_ok, state)
        return batch_ok, too_small, tf.shape(tf.nest.flatten(x)[0])[0]

    def step_checked(self, x, index):
        """Runs one batch; returns (accepted, skipped for m < 2, batch size). Shape errors name
        the batch."""
        self._check_shapes(x, index)
        try:
            accepted, too_small, size = self.step(x)
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
            raise ValueError(
                f"The data does not fit the model (batch {index}): {_short(error)}\nReceived: "
                f"inputs of shape {describe_inputs(x)}"
            ) from error
        return bool(accepted), bool(too_small), int(size)

    def _check_shapes(self, x, index):
        """Every batch's inputs have the first batch's per-sample shapes, and those fit the
        model's declared inputs: the traced step relaxes shapes and would average a batch of
        another spatial size into the estimate."""
        shapes = [tuple(np.shape(t))[1:] for t in tf.nest.flatten(x)]
        if index == 0:
            self._first_batch = (shapes, describe_inputs(x))
            self._check_declared_shapes(x, shapes)
        elif shapes != self._first_batch[0]:
            raise ValueError(
                f"Every batch must have the first batch's per-sample shape, but batch {index} "
                f"differs. Received: inputs of shape {describe_inputs(x)} in batch {index}, "
                f"{self._first_batch[1]} in batch 0"
            )

    def _check_declared_shapes(self, x, shapes):
        model = self._model()
        declared = getattr(model, "inputs", None) or []
        if len(declared) != 1 or len(shapes) != 1:
            return  # a subclassed model, or several inputs the call maps itself
        for spec, shape in zip(declared, shapes, strict=True):
            expected = tuple(spec.shape)[1:]
            if len(expected) != len(shape) or any(
                e is not None and e != d for e, d in zip(expected, shape, strict=True)
            ):
                raise ValueError(
                    f"The data does not fit the model (batch 0): the model takes inputs of "
                    f"shape {tuple(spec.shape)}\nReceived: inputs of shape {describe_inputs(x)}"
                )


def _short(error):
    """The gist of an error. A TensorFlow runtime error carries the graph's whole Python stack
    before its last line, which says what went wrong (the full error stays chained)."""
    if not isinstance(error, tf.errors.OpError):
        return str(error)
    lines = [line.strip() for line in error.message.splitlines()]
    gist = [line for line in lines if line and not line.startswith("[[")]
    return gist[-1] if gist else error.message


# Keyed weakly by model, so a model's traced step is reused across passes (the callback runs
# one per epoch) and forgotten with the model.
_PASS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def population_pass(model, layers):
    """The model's `PopulationPass` for these layers, its accumulators reset."""
    compiled = _PASS_CACHE.get(model)
    if compiled is None or compiled.layer_ids != tuple(id(layer) for layer in layers):
        compiled = PopulationPass(model, layers)
        _PASS_CACHE[model] = compiled
    compiled.reset()
    return compiled


def commit(accumulators):
    """Writes the estimates to the layers. Returns (updated names, unreached names).

    A kerasbn layer sets them itself (`BatchNormalization.set_population_statistics`: it knows
    which of its variables hold them); a Keras layer gets its public weights written, as its
    own training step writes them.
    """
    # Read everything first, so the writes below are all that happens to the layers.
    estimates = [(acc.layer, [v.numpy() for v in acc.variables]) for acc in accumulators]
    updated, unreached = [], []
    for layer, (mean, variance, count, dof) in estimates:
        if not np.any(count > 0):
            unreached.append(layer.name)
            continue
        if isinstance(layer, BatchNormalization):
            layer.set_population_statistics(mean, variance, count, dof)
        else:
            _set_keras_statistics(layer, mean, variance)
        updated.append(layer.name)
    return tuple(updated), tuple(unreached)


def _set_keras_statistics(layer: keras.layers.BatchNormalization, mean, variance):
    layer.moving_mean.assign(mean)
    layer.moving_variance.assign(variance)
    # A renorm layer derives its variance from `moving_stddev` at its next training step.
    if getattr(layer, "renorm", False):
        layer.moving_stddev.assign(np.sqrt(variance + layer.epsilon))
