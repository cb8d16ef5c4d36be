"""`kerasbn.BatchNormalization`: a drop-in for `keras.layers.BatchNormalization`.

The layer owns arguments, weights, configuration and the choice of mode; the math lives in
`kernel` (the transform and its backward pass) and `updates` (how a batch changes the stored
statistics).
"""

from __future__ import annotations

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf
from keras import constraints, initializers, ops, regularizers

from kerasbn import _keras_compat, _sync, kernel, updates
from kerasbn import activation as activations
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
        center, scale: bools, whether to use `beta` and `gamma`.
        beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_variance_initializer, beta_regularizer, gamma_regularizer, beta_constraint,
        gamma_constraint: as in `keras.layers.BatchNormalization`.
        renorm: bool, Batch Renormalization (Ioffe, 2017) with Keras 3.14+'s semantics: in
            training y = gamma·(r·x̂ + d) + beta, r = σ_B/σ and d = (μ_B − μ)/σ against the
            renorm statistics μ = `renorm_mean`, σ = max(`renorm_stddev`, √epsilon), clipped,
            and constants in the backward pass. Inference is plain BN.
        renorm_clipping: with `renorm`, a dict of optional "rmax", "rmin", "dmax": r is clipped
            to [rmin, rmax] and d to [−dmax, dmax]; missing ones are inf, 0, inf (no clip).
        renorm_momentum: in [0, 1], the momentum of the renorm statistics (which affect
            training); `momentum` still gives the inference statistics.
        synchronized: bool; under a `tf.distribute` strategy with several replicas, take batch
            statistics over the global batch. Without a strategy it has no effect. Not with
            `renorm` or `virtual_batch_size` across several replicas (a clear error at the
            first training call).
        statistics: how the inference statistics are kept.
            `"moving_average"` (default): exponential moving averages of the batch statistics.
            `"population"`: the paper's Algorithm 2 over every training-mode batch since the
            last `reset_statistics()`: mean = Σ m_B·μ_B / Σ m_B and
            variance = Σ m_B·σ²_B / Σ (m_B − 1), which is E_B[μ_B] and m/(m−1)·E_B[σ²_B] when
            all batches have m values (see `kerasbn.updates`).
        unbiased_variance: bool; store m/(m−1)·σ²_B in the moving averages (as the paper and
            PyTorch do). `False` stores the biased σ²_B, matching Keras exactly.
        renorm_warmup_steps: None, or with `renorm` a positive n (not in Keras): over the first
            n training steps the clipping bounds are relaxed linearly from plain BN, as in the
            renorm paper: with t = min(step/n, 1), rmax_t = 1 + t·(rmax − 1),
            rmin_t = 1 − t·(1 − rmin), dmax_t = t·dmax (so r = 1, d = 0 at step 0). Needs
            "rmax" and "dmax" in `renorm_clipping`. The step counter is the `renorm_step` weight.
        virtual_batch_size: None, or k > 0 for ghost batches (not in Keras 3; tf.keras 2 had
            it): in training each group of k consecutive examples is normalized with its own
            moments. The batch size must be a multiple of k. The stored statistics get one
            update per batch from all groups pooled: mean = the batch mean, variance = the mean
            within-group variance Σ m_g·σ²_g / Σ m_g, or with `unbiased_variance` the pooled
            Σ m_g·σ²_g / Σ (m_g − 1) (an unbiased estimate of the population variance; tf.keras
            2 stored the biased one). Inference is unchanged. Axis 0 must not be normalized.
        activation: None (linear), or a Keras activation (name or function) applied to the
            output: the layer computes activation(BN(x)), as BN followed by
            `keras.layers.Activation` would. "relu", "relu6", "sigmoid", "silu"/"swish" and
            "hard_silu"/"hard_swish" are fused into the training kernel, forward and backward
            (one pass over the data instead of three); any other activation is applied after
            the kernel. In inference it follows the multiply-add. Folding moves it onto the
            layer the BN folds into (`kerasbn.export`). With `synchronized=True` across
            replicas it is applied after the synchronized kernel (not fused).

    A training batch whose statistics are not finite, or (unbiased) with m = 1 known only at
    run time, leaves the statistics unchanged and adds one to `skipped_updates`. So does a
    batch whose mask is all zeros, whose outputs are (x − k)/√epsilon·gamma + beta as in Keras.

    Inputs are computed as Keras computes them: integer inputs are cast to float32 first,
    float64 stays float64 (statistics too), float16/bfloat16 are computed in float32; the
    output has the layer's compute dtype.

    Weights, in this order: `gamma`, `beta` (when enabled), `moving_mean`, `moving_variance`,
    with `renorm` `moving_stddev`, `renorm_mean`, `renorm_stddev` (Keras's names and order, so
    Keras BN weights load into this layer), then `skipped_updates`, in the population mode
    `population_count` (Σ m_B) and `population_dof` (Σ (m_B − 1)), and with
    `renorm_warmup_steps` `renorm_step`.
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
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        statistics="moving_average",
        unbiased_variance=True,
        renorm_warmup_steps=None,
        virtual_batch_size=None,
        activation=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.axis = canonical_axis(axis)
        for name, value in (
            ("center", center), ("scale", scale), ("renorm", renorm),
            ("synchronized", synchronized), ("unbiased_variance", unbiased_variance),
        ):
            _check_bool(name, value)
        _check_fraction("momentum", momentum)
        _check_fraction("renorm_momentum", renorm_momentum)
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
        # As Keras: the clipping is checked, and {} stands for None, only with renorm.
        if renorm:
            renorm_clipping = _checked_renorm_clipping(renorm_clipping)
        _check_renorm_warmup(renorm_warmup_steps, bool(renorm), renorm_clipping)
        _check_optional_positive_int("virtual_batch_size", virtual_batch_size)
        self.activation = activations.get(activation)
        # A name of `kerasbn.activation.FUSED`: applied inside the training kernel.
        self._fused_activation = activations.fused_name(self.activation)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.renorm = bool(renorm)
        self.renorm_clipping = renorm_clipping
        self.renorm_momentum = float(renorm_momentum)
        # Plain ints (not NumPy's), so that the config serializes.
        self.renorm_warmup_steps = _optional_int(renorm_warmup_steps)
        self.virtual_batch_size = _optional_int(virtual_batch_size)
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
        self.moving_stddev = None
        self.renorm_mean = None
        self.renorm_stddev = None
        self.renorm_step = None
        self.population_count = None
        self.population_dof = None
        # Set only inside `reporting_batch_moments`.
        self._batch_moments_report = None

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
        if self.virtual_batch_size is not None and 0 in self._axes:
            raise ValueError(
                "Ghost batches split the batch axis, which this layer normalizes (axis 0). "
                f"Received: axis={self.axis!r}, virtual_batch_size={self.virtual_batch_size}"
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
        if self.renorm:
            # As Keras: the standard deviations start at √ of the variance initializer's value.
            self.moving_stddev = statistic("moving_stddev", self._initial_stddev)
            self.renorm_mean = statistic("renorm_mean", self._initial_mean)
            self.renorm_stddev = statistic("renorm_stddev", self._initial_stddev)
        self.skipped_updates = statistic(
            "skipped_updates", "zeros", dtype="int64", shape=(), aggregation="only_first_replica"
        )
        if self.statistics == "population":
            self.population_count = statistic("population_count", "zeros")
            self.population_dof = statistic("population_dof", "zeros")
        if self.renorm_warmup_steps is not None:
            self.renorm_step = statistic(
                "renorm_step", "zeros", dtype="int64", shape=(),
                aggregation="only_first_replica",
            )
        self.input_spec = keras.layers.InputSpec(
            ndim=rank, axes={a: input_shape[a] for a in self._axes}
        )

    def _initial_mean(self, shape, dtype=None):
        return _clone_initializer(self.moving_mean_initializer)(shape, dtype=dtype)

    def _initial_stddev(self, shape, dtype=None):
        return ops.sqrt(_clone_initializer(self.moving_variance_initializer)(shape, dtype=dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    # --- call ------------------------------------------------------------------------------

    def call(self, inputs, training=None, mask=None):
        # As Keras: integer (and bool) inputs are computed in float32, float64 stays float64.
        # float16/bfloat16 go to the kernel as they are: it computes in float32 internally.
        if not inputs.dtype.is_floating:
            inputs = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        # As in Keras: a frozen BN (trainable=False) runs in inference mode, for fine-tuning.
        if self._batch_moments_report is not None and self.trainable:
            outputs = self._reporting_call(inputs, mask)
        elif training and self.trainable:
            outputs = self._training_call(inputs, mask)
        else:
            outputs = self._inference_call(inputs)
        return ops.cast(outputs, self.compute_dtype)

    def _per_channel(self, weight, default, dtype):
        return kernel.per_channel(weight, default, self._broadcast_shape, dtype)

    def _inference_call(self, inputs):
        dtype = kernel.statistics_dtype(inputs.dtype)
        scale, offset = kernel.inference_affine(
            self._per_channel(self.gamma, 1.0, dtype),
            self._per_channel(self.beta, 0.0, dtype),
            self._per_channel(self.moving_mean, 0.0, dtype),
            self._per_channel(self.moving_variance, 1.0, dtype),
            self.epsilon,
        )
        return tf.cast(self._activate(tf.cast(inputs, dtype) * scale + offset), inputs.dtype)

    def _activate(self, outputs):
        """The layer's activation, applied outside the kernel."""
        if activations.is_linear(self.activation):
            return outputs
        return self.activation(outputs)

    def _training_call(self, inputs, mask):
        dtype = kernel.statistics_dtype(inputs.dtype)
        weights = kernel.mask_weights(inputs, mask)
        batch_norm = _sync.select_batch_norm(self.synchronized)
        synchronizing = batch_norm is not kernel.fused_batch_norm
        if synchronizing and (self.renorm or self.virtual_batch_size is not None):
            raise ValueError(
                "Synchronized batch normalization across replicas implements neither Batch "
                "Renormalization nor ghost batches. Received: synchronized=True with "
                f"renorm={self.renorm}, virtual_batch_size={self.virtual_batch_size}"
            )
        arguments = dict(
            reduction_axes=self._reduction_axes, epsilon=self.epsilon, weights=weights
        )
        if self.renorm:
            arguments["renorm"] = self._renorm_inputs(dtype)
        # The synchronized kernel has no fused activation: it is applied after it.
        fused = self._fused_activation is not None and not synchronizing
        if fused:
            arguments["activation"] = self._fused_activation
        gamma = self._per_channel(self.gamma, 1.0, dtype)
        beta = self._per_channel(self.beta, 0.0, dtype)
        rule = self._update_rule()
        state = {variable.name: variable.value for variable in self._statistics_variables()}
        if synchronizing:
            # Only an unsynchronized batch must hold m > 1 itself: a replica's share may hold
            # one. The collectives run between compiled stages, so the update runs here.
            outputs, mean, variance, count = batch_norm(inputs, gamma, beta, **arguments)
            new_state, _ = rule(state, mean, variance, count)
        else:
            # The fused kernel computes the new statistics in its compiled forward.
            arguments["update"] = kernel.StatisticsUpdate(rule, state)
            if self.virtual_batch_size is not None:
                inputs = self._checked_ghost_batches(inputs, weights)
                outputs, new_state, _ = kernel.ghost_batch_norm(
                    inputs, gamma, beta, virtual_batch_size=self.virtual_batch_size, **arguments
                )
            else:
                if weights is None:
                    self._check_batch_has_several_values(inputs.shape)
                outputs, new_state, _ = kernel.fused_batch_norm(
                    inputs, gamma, beta, **arguments
                )
        self._write_statistics(new_state)
        return outputs if fused else self._activate(outputs)

    def _reporting_call(self, inputs, mask):
        """Training-mode output with the batch's moments handed to the report, no update."""
        dtype = kernel.statistics_dtype(inputs.dtype)
        outputs, *moments = kernel.batch_norm_forward(
            inputs, self._per_channel(self.gamma, 1.0, dtype),
            self._per_channel(self.beta, 0.0, dtype), reduction_axes=self._reduction_axes,
            epsilon=self.epsilon, weights=kernel.mask_weights(inputs, mask),
            activation=self._fused_activation,
        )
        shape, stored = self.moving_mean.shape, self.moving_mean.dtype
        self._batch_moments_report(*(tf.cast(tf.reshape(t, shape), stored) for t in moments))
        return outputs if self._fused_activation is not None else self._activate(outputs)

    def _check_batch_has_several_values(self, shape, what="batch"):
        dims = [shape[a] for a in self._reduction_axes]
        if all(d is not None for d in dims) and math.prod(dims) == 1:
            raise ValueError(
                f"A training {what} needs more than one value per channel to compute batch "
                "statistics (the paper's m), but this one has m = 1. Use a larger batch, or "
                f"call the layer with training=False. Received: inputs.shape={tuple(shape)}"
                + (f", virtual_batch_size={self.virtual_batch_size}" if what != "batch" else "")
            )

    def _checked_ghost_batches(self, inputs, weights):
        """The inputs, checked to split into ghost batches: statically where the batch size
        is known at trace time, else by an assertion that runs before the kernel."""
        k = self.virtual_batch_size
        size = inputs.shape[0]
        message = (
            f"The batch size must be a multiple of virtual_batch_size={k}. Received: "
            f"inputs.shape={tuple(inputs.shape)}"
        )
        if weights is None:
            self._check_batch_has_several_values((k, *inputs.shape[1:]), "ghost batch")
        if size is not None:
            if size % k:
                raise ValueError(message)
            return inputs
        check = tf.debugging.assert_equal(tf.shape(inputs)[0] % k, 0, message=message)
        with tf.control_dependencies([check]):
            return tf.identity(inputs)

    def _renorm_inputs(self, dtype):
        """`kernel.Renorm` for this step: the renorm statistics and the clipping bounds, the
        latter relaxed from plain BN over `renorm_warmup_steps`."""
        clipping = self.renorm_clipping or {}
        rmin = clipping.get("rmin")
        rmax = clipping.get("rmax")
        dmax = clipping.get("dmax")
        rmin = 0.0 if rmin is None else float(rmin)
        rmax = math.inf if rmax is None else float(rmax)
        dmax = math.inf if dmax is None else float(dmax)
        if self.renorm_step is not None:
            progress = tf.minimum(
                tf.cast(self.renorm_step.value, dtype) / float(self.renorm_warmup_steps), 1.0
            )
            rmin = 1.0 - progress * (1.0 - rmin)
            rmax = 1.0 + progress * (rmax - 1.0)
            dmax = progress * dmax
        return kernel.Renorm(
            mean=self._per_channel(self.renorm_mean, 0.0, dtype),
            stddev=self._per_channel(self.renorm_stddev, 1.0, dtype),
            rmin=rmin, rmax=rmax, dmax=dmax,
        )

    def _update_rule(self):
        return updates.UpdateRule(
            statistics=self.statistics, momentum=self.momentum, epsilon=self.epsilon,
            unbiased_variance=self.unbiased_variance,
            renorm_momentum=self.renorm_momentum if self.renorm else None,
        )

    def _statistics_variables(self):
        """The stored statistics and counters `updates.UpdateRule` updates, those this layer
        has."""
        return [
            v for v in (
                self.moving_mean, self.moving_variance, self.moving_stddev, self.renorm_mean,
                self.renorm_stddev, self.population_count, self.population_dof,
                self.skipped_updates, self.renorm_step,
            )
            if v is not None
        ]

    def _write_statistics(self, new_state):
        """The variable writes of one batch's update: all that is left outside the kernel
        (values kept where the batch was not accepted, counters counted, by the rule)."""
        for variable in self._statistics_variables():
            variable.assign(new_state[variable.name])

    # --- Algorithm 2 over a whole model ----------------------------------------------------

    @contextlib.contextmanager
    def reporting_batch_moments(self, report):
        """A scope in which each call of the layer reports its batch moments and updates nothing.

        The hook of `kerasbn.population_statistics` (the paper's Algorithm 2 for a trained
        model), public for passes of your own. Inside the scope every call of the layer,
        whatever `training` says, normalizes its input with the batch's own moments, as in
        training, so the layers after it see what they saw in training (after the layer's
        activation, fused or not); and calls

            report(mean, variance, count)

        with the batch mean, the biased batch variance σ²_B and the number m of values behind
        each statistic (masked positions not counted), per channel in the shape and dtype of
        `moving_mean`. The stored statistics and counters are left alone: what to do with the
        moments is the caller's (e.g. pool them with `kerasbn.updates.population_update` and
        set the result with `set_population_statistics`). Renorm and ghost-batch layers report
        the plain moments of the whole batch: their inference is plain BN.

        A frozen layer (`trainable=False`) runs in inference mode and reports nothing, as in
        training. The layer is called once per forward pass, or more when it is shared: each
        call reports. Inside a `tf.function`, the calls, and so the reports, happen while it is
        traced, with symbolic tensors. One report at a time: nesting raises `ValueError`.
        """
        if not callable(report):
            raise TypeError(f"`report` must be callable. Received: report={report!r}")
        if self._batch_moments_report is not None:
            raise ValueError(
                f"Layer {self.name!r} is already reporting its batch moments: one scope at a "
                f"time. Received: report={report!r}"
            )
        self._batch_moments_report = report
        try:
            yield
        finally:
            self._batch_moments_report = None

    def set_population_statistics(self, mean, variance, count, dof):
        """Set the inference statistics to a population estimate (Algorithm 2).

        Args:
            mean: Σ m_B·μ_B / Σ m_B, per channel (the shape of `moving_mean`).
            variance: the unbiased Σ m_B·σ²_B / Σ (m_B − 1), per channel; stored as it is,
                whatever `unbiased_variance` (which is about the moving averages).
            count: Σ m_B, the values the estimate was taken over, per channel.
            dof: Σ (m_B − 1), per channel.

        Writes `moving_mean` and `moving_variance`; with renorm `moving_stddev` =
        √(variance + epsilon), the value its next training step derives the variance from; in
        the population mode `population_count` and `population_dof`, so that later
        training-mode batches pool with this estimate. `skipped_updates` is not touched. The
        layer owns this choice of variables, so that a pass over a whole model need not know
        them. Every value is checked (built layer, shapes) before any is written.
        """
        if not self.built:
            raise ValueError(
                f"Layer {self.name!r} is not built: it has no statistics to set yet. Received: "
                "an unbuilt layer"
            )
        values = {"mean": mean, "variance": variance, "count": count, "dof": dof}
        expected = tuple(self.moving_mean.shape)
        for name, value in values.items():
            if tuple(np.shape(value)) != expected:
                raise ValueError(
                    f"`{name}` must have the shape of moving_mean, {expected}. Received: "
                    f"{name} of shape {tuple(np.shape(value))}"
                )
        self.moving_mean.assign(mean)
        self.moving_variance.assign(variance)
        if self.moving_stddev is not None:
            self.moving_stddev.assign(np.sqrt(np.asarray(variance) + self.epsilon))
        if self.population_count is not None:
            self.population_count.assign(count)
            self.population_dof.assign(dof)

    # --- state -----------------------------------------------------------------------------

    def reset_statistics(self):
        """Return the inference statistics to their initial values and forget every batch.

        In the population mode the next training-mode batches start a new Algorithm 2
        estimate; `skipped_updates` (and with renorm, the renorm statistics and `renorm_step`)
        restart too.
        """
        if not self.built:
            return
        initial_values = (
            (self.moving_mean, self._initial_mean),
            (self.moving_variance, _clone_initializer(self.moving_variance_initializer)),
            (self.moving_stddev, self._initial_stddev),
            (self.renorm_mean, self._initial_mean),
            (self.renorm_stddev, self._initial_stddev),
        )
        for variable, initializer in initial_values:
            if variable is not None:
                variable.assign(initializer(variable.shape, dtype=variable.dtype))
        for counter in (self.skipped_updates, self.population_count, self.population_dof,
                        self.renorm_step):
            if counter is not None:
                counter.assign(tf.zeros_like(counter.value))

    def _keras_compatible_variables(self):
        """The variables `keras.layers.BatchNormalization` has, in its order."""
        return [
            v for v in (
                self.gamma, self.beta, self.moving_mean, self.moving_variance,
                self.moving_stddev, self.renorm_mean, self.renorm_stddev,
            )
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
        values = _keras_compat.saved_variables(store)
        if len(values) == len(self._keras_compatible_variables()) != len(self.variables):
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
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
            "statistics": self.statistics,
            "unbiased_variance": self.unbiased_variance,
            "renorm_warmup_steps": self.renorm_warmup_steps,
            "virtual_batch_size": self.virtual_batch_size,
            "activation": keras.activations.serialize(self.activation),
        }
        return {**super().get_config(), **config}


# --- argument checks ---------------------------------------------------------------------------


def _check_bool(name, value):
    # A string such as "no" is truthy: refusing it is kinder than reading it as True.
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a bool. Received: {name}={value!r}")


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _check_fraction(name, value):
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1]. Received: {name}={value!r}")


def _check_optional_positive_int(name, value):
    if value is not None and (
        not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1
    ):
        raise ValueError(
            f"`{name}` must be None or a positive integer. Received: {name}={value!r}"
        )


_RENORM_CLIPPING_KEYS = ["rmax", "rmin", "dmax"]


def _checked_renorm_clipping(renorm_clipping):
    """Keras's checks and messages (as f-strings), plus: the bounds are numbers or None."""
    renorm_clipping = renorm_clipping or {}
    if not isinstance(renorm_clipping, dict):
        raise TypeError(
            "`renorm_clipping` must be a dict with keys among "
            f"{_RENORM_CLIPPING_KEYS}. Received: renorm_clipping={renorm_clipping!r}"
        )
    if set(renorm_clipping) - set(_RENORM_CLIPPING_KEYS):
        raise ValueError(
            "Received invalid keys for `renorm_clipping` argument: "
            f"{renorm_clipping}. Supported values: {_RENORM_CLIPPING_KEYS}."
        )
    for key, value in renorm_clipping.items():
        if value is not None and (not _is_number(value) or math.isnan(value)):
            raise ValueError(
                f"`renorm_clipping[{key!r}]` must be a number or None. Received: "
                f"renorm_clipping={renorm_clipping!r}"
            )
    rmax = renorm_clipping.get("rmax")
    rmin = renorm_clipping.get("rmin")
    dmax = renorm_clipping.get("dmax")
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(
            "rmax should be greater than rmin in the `renorm_clipping` argument. "
            f"Received: rmax={rmax}, rmin={rmin}."
        )
    if dmax is not None and dmax < 0:
        raise ValueError(
            "dmax should be non-negative in the `renorm_clipping` argument. "
            f"Received: dmax={dmax}."
        )
    # Plain floats (not NumPy's), so that the config serializes.
    return {key: None if value is None else float(value) for key, value in renorm_clipping.items()}


def _optional_int(value):
    return None if value is None else int(value)


def _check_renorm_warmup(steps, renorm, renorm_clipping):
    _check_optional_positive_int("renorm_warmup_steps", steps)
    if steps is None:
        return
    if not renorm:
        raise ValueError(
            "`renorm_warmup_steps` schedules Batch Renormalization's clipping and needs "
            f"renorm=True. Received: renorm_warmup_steps={steps}, renorm=False"
        )
    missing = [k for k in ("rmax", "dmax") if renorm_clipping.get(k) is None]
    if missing or not all(math.isfinite(renorm_clipping[k]) for k in ("rmax", "dmax")):
        raise ValueError(
            "`renorm_warmup_steps` relaxes rmax from 1 and dmax from 0 to finite final values, "
            "so `renorm_clipping` must give finite 'rmax' and 'dmax'. Received: "
            f"renorm_clipping={renorm_clipping!r}, renorm_warmup_steps={steps}"
        )
    if renorm_clipping.get("rmax") < 1.0 or renorm_clipping.get("rmin", 0.0) > 1.0:
        raise ValueError(
            "`renorm_warmup_steps` starts from plain BN (r = 1), so the final clipping must "
            f"hold r = 1: rmin <= 1 <= rmax. Received: renorm_clipping={renorm_clipping!r}"
        )


def _clone_initializer(initializer):
    """A fresh copy of a Keras initializer (as Keras's BN clones them): a seeded initializer
    called twice must not return the same values for two weights."""
    if isinstance(initializer, initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer
