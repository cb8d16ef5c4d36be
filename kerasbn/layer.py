"""`kerasbn.BatchNormalization`: a drop-in for `keras.layers.BatchNormalization`.

The layer owns arguments, weights, configuration and the choice of mode; the math lives in
`kernel` (the transform and its backward pass) and `updates` (how a batch changes the stored
statistics).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import constraints, initializers, ops, regularizers

from kerasbn import _sync, kernel, updates
from kerasbn._axes import canonical_axis, normalize_axes, reduction_axes

STATISTICS_MODES = ("moving_average", "population")


@keras.saving.register_keras_serializable(package="kerasbn")
class BatchNormalization(keras.layers.Layer):
    """Batch normalization (Ioffe & Szegedy, 2015) with a fused XLA training kernel.

    Training (`training=True` and `trainable=True`) normalizes with the batch's own statistics,
    taken over every axis but `axis` (for a conv output: batch and spatial positions, so
    m = N·H·W values per channel):

        y = gamma · (x − μ_B) / sqrt(σ²_B + epsilon) + beta,   σ²_B biased (Algorithm 1)

    Inference uses the stored `moving_mean` and `moving_variance` as one multiply-add.

    Args:
        axis: int or tuple of ints, the normalized (channel) axes; one gamma/beta/statistic per
            position on them. `-1` for channels-last, `1` for channels-first.
        momentum: in [0, 1], for `statistics="moving_average"`:
            `new = momentum · old + (1 − momentum) · batch`.
        epsilon: >= 0, added to the variance.
        center, scale: whether to use `beta` and `gamma`.
        beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_variance_initializer, beta_regularizer, gamma_regularizer, beta_constraint,
        gamma_constraint: as in `keras.layers.BatchNormalization`.
        synchronized: under a `tf.distribute` strategy with several replicas, take batch
            statistics over the global batch. Without a strategy it has no effect.
        statistics: how the inference statistics are kept.
            `"moving_average"` (default): exponential moving averages of the batch statistics.
            `"population"`: the paper's Algorithm 2 over every training-mode batch since the
            last `reset_statistics()`: mean = Σ m_B·μ_B / Σ m_B and
            variance = Σ m_B·σ²_B / Σ (m_B − 1), which is E_B[μ_B] and m/(m−1)·E_B[σ²_B] when
            all batches have m values (see `kerasbn.updates`).
        unbiased_variance: in the moving-average mode, store m/(m−1)·σ²_B (as the paper and
            PyTorch do). `False` stores the biased σ²_B, matching Keras exactly.

    A training batch whose statistics are not finite, or (unbiased) with m = 1 known only at
    run time, leaves the statistics unchanged and adds one to `skipped_updates`.

    Weights, in this order: `gamma`, `beta` (when enabled), `moving_mean`, `moving_variance`
    (Keras's names and order, so Keras BN weights load into this layer), then
    `skipped_updates`, and in the population mode `population_count` (Σ m_B) and
    `population_dof` (Σ (m_B − 1)).
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        synchronized=False,
        statistics="moving_average",
        unbiased_variance=True,
        renorm=False,
        **kwargs,
    ):
        # Keras's own configs carry these two with renorm; accept them so a Keras BN config loads.
        kwargs.pop("renorm_clipping", None)
        kwargs.pop("renorm_momentum", None)
        super().__init__(**kwargs)
        if renorm:
            raise ValueError(
                "kerasbn.BatchNormalization does not implement Batch Renormalization; use "
                f"keras.layers.BatchNormalization for it. Received: renorm={renorm!r}"
            )
        self.axis = canonical_axis(axis)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (
            0.0 <= momentum <= 1.0
        ):
            raise ValueError(
                f"`momentum` must be a number in [0, 1]. Received: momentum={momentum!r}"
            )
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (
            0.0 <= epsilon < math.inf
        ):
            raise ValueError(
                f"`epsilon` must be a finite number >= 0. Received: epsilon={epsilon!r}"
            )
        if statistics not in STATISTICS_MODES:
            raise ValueError(
                f"`statistics` must be one of {STATISTICS_MODES}. "
                f"Received: statistics={statistics!r}"
            )
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.synchronized = bool(synchronized)
        self.statistics = statistics
        self.unbiased_variance = bool(unbiased_variance)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.supports_masking = True
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self.population_count = None
        self.population_dof = None

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        rank = len(input_shape)
        if rank < 2:
            raise ValueError(
                "BatchNormalization needs an input of rank >= 2 (a batch axis and a feature "
                f"axis). Received: input_shape={input_shape}"
            )
        self._axes = normalize_axes(self.axis, rank)
        self._reduction_axes = reduction_axes(self._axes, rank)
        unknown = [a for a in self._axes if input_shape[a] is None]
        if unknown:
            raise ValueError(
                f"The size of a normalized axis must be known when the layer is built, but "
                f"axis {unknown[0]} has unknown size. Received: input_shape={input_shape}, "
                f"axis={self.axis!r}"
            )
        param_shape = tuple(input_shape[a] for a in self._axes)
        # Per-channel tensors broadcast against inputs in "keepdims" shape.
        self._broadcast_shape = [input_shape[a] if a in self._axes else 1 for a in range(rank)]

        def statistic(name, initializer, dtype=None, shape=param_shape, aggregation="mean"):
            # Under a tf.distribute strategy each replica updates its own copy; "mean" keeps the
            # copies equal (Keras 3 leaves them "none", so replicas drift apart and reads
            # return replica 0's).
            return self.add_weight(
                shape=shape, name=name, initializer=initializer, dtype=dtype,
                trainable=False, autocast=False, aggregation=aggregation,
            )

        if self.scale:
            self.gamma = self.add_weight(
                shape=param_shape, name="gamma", initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer, constraint=self.gamma_constraint,
                trainable=True, autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=param_shape, name="beta", initializer=self.beta_initializer,
                regularizer=self.beta_regularizer, constraint=self.beta_constraint,
                trainable=True, autocast=False,
            )
        self.moving_mean = statistic("moving_mean", self.moving_mean_initializer)
        self.moving_variance = statistic("moving_variance", self.moving_variance_initializer)
        self.skipped_updates = statistic(
            "skipped_updates", "zeros", dtype="int64", shape=(), aggregation="only_first_replica"
        )
        if self.statistics == "population":
            self.population_count = statistic("population_count", "zeros")
            self.population_dof = statistic("population_dof", "zeros")
        self.input_spec = keras.layers.InputSpec(
            ndim=rank, axes={a: input_shape[a] for a in self._axes}
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    # --- call ------------------------------------------------------------------------------

    def call(self, inputs, training=None, mask=None):
        # As in Keras: a frozen BN (trainable=False) runs in inference mode, for fine-tuning.
        if training and self.trainable:
            outputs = self._training_call(inputs, mask)
        else:
            outputs = self._inference_call(inputs)
        return ops.cast(outputs, self.compute_dtype)

    def _per_channel(self, weight, default):
        return kernel.per_channel(weight, default, self._broadcast_shape)

    def _inference_call(self, inputs):
        scale, offset = kernel.inference_affine(
            self._per_channel(self.gamma, 1.0),
            self._per_channel(self.beta, 0.0),
            self._per_channel(self.moving_mean, 0.0),
            self._per_channel(self.moving_variance, 1.0),
            self.epsilon,
        )
        return tf.cast(tf.cast(inputs, kernel.STATISTICS_DTYPE) * scale + offset, inputs.dtype)

    def _training_call(self, inputs, mask):
        weights = kernel.mask_weights(inputs, mask)
        batch_norm = _sync.select_batch_norm(self.synchronized)
        # Only an unsynchronized batch must hold m > 1 itself: a replica's share may hold one.
        if weights is None and batch_norm is kernel.fused_batch_norm:
            self._check_batch_has_several_values(inputs)
        outputs, mean, variance, count = batch_norm(
            inputs,
            self._per_channel(self.gamma, 1.0),
            self._per_channel(self.beta, 0.0),
            reduction_axes=self._reduction_axes,
            epsilon=self.epsilon,
            weights=weights,
        )
        channel_shape = self.moving_mean.shape
        self._update_statistics(*(tf.reshape(t, channel_shape) for t in (mean, variance, count)))
        return outputs

    def _check_batch_has_several_values(self, inputs):
        dims = [inputs.shape[a] for a in self._reduction_axes]
        if all(d is not None for d in dims) and math.prod(dims) == 1:
            raise ValueError(
                "A training batch needs more than one value per channel to compute batch "
                "statistics (the paper's m), but this one has m = 1. Use a larger batch, or "
                f"call the layer with training=False. Received: inputs.shape={tuple(inputs.shape)}"
            )

    def _update_statistics(self, mean, variance, count):
        if self.statistics == "population":
            new_mean, new_variance, new_count, new_dof, accepted = updates.population_update(
                self.moving_mean.value, self.moving_variance.value,
                self.population_count.value, self.population_dof.value,
                mean, variance, count,
            )
            self.population_count.assign(new_count)
            self.population_dof.assign(new_dof)
        else:
            new_mean, new_variance, accepted = updates.moving_average_update(
                self.moving_mean.value, self.moving_variance.value, mean, variance, count,
                momentum=self.momentum, unbiased_variance=self.unbiased_variance,
            )
        self.moving_mean.assign(new_mean)
        self.moving_variance.assign(new_variance)
        self.skipped_updates.assign_add(tf.cast(tf.logical_not(accepted), "int64"))

    # --- state -----------------------------------------------------------------------------

    def reset_statistics(self):
        """Return the inference statistics to their initial values and forget every batch.

        In the population mode the next training-mode batches start a new Algorithm 2
        estimate; `skipped_updates` restarts from zero too.
        """
        if not self.built:
            return
        self.moving_mean.assign(self.moving_mean_initializer(self.moving_mean.shape, "float32"))
        self.moving_variance.assign(
            self.moving_variance_initializer(self.moving_variance.shape, "float32")
        )
        self.skipped_updates.assign(0)
        if self.statistics == "population":
            self.population_count.assign(tf.zeros_like(self.population_count.value))
            self.population_dof.assign(tf.zeros_like(self.population_dof.value))

    def _keras_compatible_variables(self):
        """The variables `keras.layers.BatchNormalization` has, in its order."""
        return [
            v for v in (self.gamma, self.beta, self.moving_mean, self.moving_variance)
            if v is not None
        ]

    def set_weights(self, weights):
        """Also accepts the weight list of a `keras.layers.BatchNormalization` of the same
        configuration (gamma, beta, moving statistics): our counters then restart from zero."""
        keras_variables = self._keras_compatible_variables()
        if self.built and len(weights) == len(keras_variables) != len(self.weights):
            self._check_shapes(keras_variables, weights)
            self.reset_statistics()
            for variable, value in zip(keras_variables, weights, strict=True):
                variable.assign(value)
            return
        super().set_weights(weights)

    def load_own_variables(self, store):
        """Loads our own saved variables, or those a `keras.layers.BatchNormalization` saved."""
        keras_variables = self._keras_compatible_variables()
        if len(store.keys()) == len(keras_variables) != len(self.variables):
            values = [store[str(i)] for i in range(len(keras_variables))]
            self.set_weights(values)
            return
        super().load_own_variables(store)

    @staticmethod
    def _check_shapes(variables, values):
        for variable, value in zip(variables, values, strict=True):
            if tuple(variable.shape) != tuple(getattr(value, "shape", ())):
                raise ValueError(
                    f"Weight {variable.name} has shape {tuple(variable.shape)}. Received: a value "
                    f"of shape {tuple(getattr(value, 'shape', ()))}"
                )

    def get_config(self):
        config = {
            "axis": list(self.axis) if isinstance(self.axis, tuple) else self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer
            ),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "statistics": self.statistics,
            "unbiased_variance": self.unbiased_variance,
        }
        return {**super().get_config(), **config}
