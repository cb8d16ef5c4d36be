"""The paper's Algorithm 2 for a trained model: population statistics from one pass over data.

`population_statistics(model, data)` runs every batch of `data` through `model` with the final
weights and no weight update, batch normalization in training mode and every other layer
(dropout, noise, ...) in inference mode, and then sets each BN layer's inference statistics to

    mean     = Σ_B m_B·μ_B  / Σ_B m_B
    variance = Σ_B m_B·σ²_B / Σ_B (m_B − 1)

over the batches B of the pass, where μ_B and σ²_B (biased) are the moments of the layer's
input on B and m_B the number of values per channel (batch size × spatial positions for a conv
feature map; unmasked positions only, with a mask). With equal batch sizes m this is exactly
the paper's E_B[μ_B] and m/(m−1)·E_B[σ²_B]; it is the rule `kerasbn.updates.population_update`
implements, and the pass uses that function for its running sums.

During the pass each BN layer outputs its training-mode result (normalized with μ_B, σ²_B), so
every BN layer sees the input distribution it saw in training, and all layers are estimated in
the same forward pass. This is done by temporarily replacing each BN layer's `call` with a
probe (restored in a `finally`) inside one `tf.function` step per batch. The probe takes the
batch moments from TensorFlow's fused batch-norm kernel where it applies (one channel axis,
last; no mask; float16/bfloat16/float32), which on CPU is several times faster than kerasbn's
XLA kernel and keeps the pass as cheap as `model.predict`, and from `kernel.fused_batch_norm`
otherwise (masks, channels-first, float64).

Atomic: the estimate is kept in separate accumulators and written to the layers only after the
whole pass succeeded. A batch whose statistics are not finite in some BN layer (or give m < 2,
so no unbiased variance) is skipped for every layer, so that all layers are estimated from the
same samples, and counted in the report.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import itertools
import types
import weakref

import keras
import numpy as np
import tensorflow as tf
from keras.src.trainers.data_adapters import array_data_adapter, get_data_adapter

from kerasbn import kernel, updates
from kerasbn._axes import normalize_axes, reduction_axes
from kerasbn.layer import BatchNormalization

# Keras's predict default, for NumPy arrays (datasets and generators are batched already).
DEFAULT_BATCH_SIZE = 32
_VERBOSE_VALUES = ("auto", 0, 1, 2)
# Both share the attributes the probe reads: axis, epsilon, scale, center, gamma, beta.
_BATCH_NORM_CLASSES = (BatchNormalization, keras.layers.BatchNormalization)


# --- the report ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PopulationReport:
    """What one `population_statistics` pass did.

    Attributes:
        layers: names of the BN layers whose statistics were set.
        batches_used: batches averaged into the estimate.
        samples_seen: samples in those batches.
        batches_skipped: batches left out because some BN layer's statistics were not finite
            (NaN/Inf in the data or activations) or had fewer than 2 values per channel.
        batches_too_small: of those, the batches skipped because some BN layer had fewer than
            2 values per channel (m < 2: no unbiased variance), whatever their values.
        steps_exceeded_data: `steps` asked for more batches than `data` had; all were used.
        frozen_layers: BN layers with `trainable=False`, left unchanged (they run in inference
            mode in training too, as in Keras).
        unreached_layers: BN layers no used batch passed through (or never built), left
            unchanged.
    """

    layers: tuple[str, ...]
    batches_used: int
    samples_seen: int
    batches_skipped: int
    steps_exceeded_data: bool
    frozen_layers: tuple[str, ...] = ()
    unreached_layers: tuple[str, ...] = ()
    batches_too_small: int = 0

    @property
    def layers_updated(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        lines = [
            f"Population statistics set for {self.layers_updated} BatchNormalization "
            f"layer(s) from {self.batches_used} batch(es), {self.samples_seen} sample(s).",
        ]
        if self.batches_skipped:
            lines.append(f"Skipped {self.batches_skipped} batch(es): {_skip_reasons(self)}.")
        if self.steps_exceeded_data:
            lines.append("`steps` exceeded the data: every available batch was used.")
        if self.frozen_layers:
            lines.append(f"Left frozen layers unchanged: {', '.join(self.frozen_layers)}.")
        if self.unreached_layers:
            lines.append(f"Left unreached layers unchanged: {', '.join(self.unreached_layers)}.")
        return "\n".join(lines)


def _skip_reasons(report):
    non_finite = report.batches_skipped - report.batches_too_small
    reasons = []
    if report.batches_too_small:
        reasons.append(
            f"{report.batches_too_small} with fewer than 2 values per channel (m < 2) in some "
            "BatchNormalization layer"
        )
    if non_finite:
        reasons.append(f"{non_finite} with non-finite statistics")
    return ", ".join(reasons)


# --- the public function ---------------------------------------------------------------------


def population_statistics(model, data, steps=None, verbose="auto", *, batch_size=None):
    """Set every BN layer's inference statistics from one training-mode pass over `data`.

    Args:
        model: a built Keras model (Sequential, Functional or subclassed; BN layers may sit in
            nested sub-models) with `kerasbn.BatchNormalization` and/or
            `keras.layers.BatchNormalization` layers.
        data: the model's inputs, as `model.predict` takes them: NumPy arrays or tensors (a
            list/tuple/dict of them for several inputs), batched by `batch_size`; or a
            `tf.data.Dataset`, a Python generator/iterator or a `keras.utils.PyDataset` of
            batches. Batches may be `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`: only `x`
            is used.
        steps: number of batches to use; `None` uses all of `data`. More batches than `data`
            has: every batch is used and the report says so.
        verbose: `"auto"` (= 1), 0 (silent), 1 (progress bar) or 2, as in `model.fit`.
        batch_size: batch size for arrays, default 32. Not allowed with batched data.

    Returns:
        A `PopulationReport`.

    What is written: `moving_mean` and `moving_variance` (the unbiased estimate, whatever the
    layer's `unbiased_variance`), and for a `kerasbn` layer in the population mode also
    `population_count` = Σ m_B and `population_dof` = Σ (m_B − 1), so that later
    training-mode batches continue this same estimate. `skipped_updates` is not touched.
    Masks reaching a BN layer are honoured as in training: masked positions are not counted.
    Frozen layers (`trainable=False`) keep their statistics and run in inference mode, as in
    training. Layers with `renorm=True` (Keras's or kerasbn's) or `virtual_batch_size` are
    treated as plain BN (moments of the whole batch; their inference is plain BN), and a renorm
    layer's `moving_stddev` is set to √(variance + epsilon) to stay consistent with its
    variance. Integer inputs are computed in float32 and float64 ones in float64, as the
    layers compute them.

    Raises:
        ValueError: empty data, no trainable BN layer, `steps` <= 0, data that does not fit
            the model, a batch whose per-sample shape differs from the first batch's (checked
            before the batch runs; the layers are only written after the whole pass), or no
            usable batch (the message says how many had m < 2 and how many were non-finite).
        TypeError: `model` is not a Keras model, or `data` is None or of an unsupported type.
    """
    _check_steps(steps)
    verbose = _check_verbose(verbose)
    _check_batch_size(batch_size)
    _check_data(data)
    probed, frozen, unbuilt = _batch_norm_layers(model)
    compiled = _compiled_pass(model, probed)
    compiled.reset()
    with _input_batches(data, batch_size, steps) as (batches, num_batches):
        target = num_batches if steps is None else steps
        progbar = keras.utils.Progbar(target, verbose=verbose, stateful_metrics=["skipped"])
        with _probes_installed(compiled.probes):
            drawn, used, seen, too_small = _run(compiled, batches, steps, progbar)
    if drawn == 0:
        raise ValueError(f"`data` yielded no batch. Received: data of type {type(data).__name__}")
    report = PopulationReport(
        layers=(),
        batches_used=used,
        samples_seen=seen,
        batches_skipped=drawn - used,
        batches_too_small=too_small,
        steps_exceeded_data=False,
    )
    if used == 0:
        raise ValueError(
            "Every batch was skipped, statistics left unchanged: "
            f"{_skip_reasons(report)}. Received: {drawn} batch(es)"
        )
    updated, unreached = _commit(compiled.accumulators)
    return dataclasses.replace(
        report,
        layers=updated,
        steps_exceeded_data=steps is not None and drawn < steps,
        frozen_layers=tuple(layer.name for layer in frozen),
        unreached_layers=tuple(layer.name for layer in unbuilt) + unreached,
    )


def _run(compiled, batches, steps, progbar):
    """Runs the step over the batches. Returns (batches drawn, batches used, samples used,
    batches skipped for m < 2)."""
    drawn = used = seen = too_small = 0
    # islice, not a check inside the loop: a generator must not be asked for one batch more.
    for x in itertools.islice(batches, steps):
        accepted, small, size = compiled.step_checked(x, drawn)
        drawn += 1
        if accepted:
            used += 1
            seen += size
        elif small:
            too_small += 1
        # Shown only when there is something to say (Progbar prints 0 as 0.0000e+00).
        skipped = [("skipped", drawn - used)] if drawn > used else None
        progbar.update(drawn, values=skipped)
    return drawn, used, seen, too_small


# --- argument checks -------------------------------------------------------------------------


def _is_positive_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def _check_steps(steps):
    if steps is not None and not _is_positive_int(steps):
        raise ValueError(f"`steps` must be a positive integer or None. Received: steps={steps!r}")


def _check_batch_size(batch_size):
    if batch_size is not None and not _is_positive_int(batch_size):
        raise ValueError(
            f"`batch_size` must be a positive integer or None. Received: batch_size={batch_size!r}"
        )


def _check_data(data):
    if data is None:
        raise TypeError(
            "`data` must be arrays, a tf.data.Dataset, a Python generator or a "
            "keras.utils.PyDataset of the model's inputs. Received: data=None"
        )


def _check_verbose(verbose):
    if isinstance(verbose, bool) or verbose not in _VERBOSE_VALUES:
        raise ValueError(
            f"`verbose` must be one of {_VERBOSE_VALUES}. Received: verbose={verbose!r}"
        )
    # As model.fit does: "auto" is the progress bar.
    return 1 if verbose == "auto" else verbose


def _batch_norm_layers(model):
    """(to estimate, frozen, never built): every BN layer at any depth, each once."""
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a Keras model. Received: model of type {type(model)}")
    if not model.built:
        raise ValueError(
            "`model` must be built (trained, or called on data) before its population "
            f"statistics can be estimated. Received: unbuilt model {model.name!r}"
        )
    # _flatten_layers walks Sequential, Functional and subclassed models and deduplicates
    # shared layers; Keras has no public recursive equivalent.
    layers = model._flatten_layers(include_self=True)
    found = [layer for layer in layers if isinstance(layer, _BATCH_NORM_CLASSES)]
    probed = [layer for layer in found if layer.trainable and layer.built]
    frozen = [layer for layer in found if not layer.trainable]
    unbuilt = [layer for layer in found if layer.trainable and not layer.built]
    if not probed:
        detail = f"only frozen ones ({len(frozen)})" if frozen else "none"
        raise ValueError(
            "`model` has no trainable, built BatchNormalization layer to estimate. Received: "
            f"model {model.name!r} with {detail}"
        )
    return probed, frozen, unbuilt


# --- data ------------------------------------------------------------------------------------


def _model_inputs(batch):
    """x of a batch `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`."""
    return keras.utils.unpack_x_y_sample_weight(batch)[0]


def _reject_batch_size(data, batch_size):
    if batch_size is not None:
        raise ValueError(
            "`batch_size` is only for arrays: this data is batched already. Received: "
            f"batch_size={batch_size!r} with data of type {type(data).__name__}"
        )


def _reject_infinite(data, num_batches, steps):
    if num_batches is None and steps is None:
        raise ValueError(
            "`data` is infinite, so `steps` is needed to end the pass. Received: steps=None "
            f"with an infinite {type(data).__name__}"
        )


@contextlib.contextmanager
def _input_batches(data, batch_size, steps):
    """Yields (iterator of model inputs per batch, number of batches or None if unknown).

    Python generators and PyDatasets are iterated in Python, not through tf.data: inside
    tf.data a KeyboardInterrupt raised by the generator would become a TensorFlow error.
    """
    if isinstance(data, tf.data.Dataset):
        _reject_batch_size(data, batch_size)
        cardinality = int(data.cardinality())
        if cardinality == tf.data.INFINITE_CARDINALITY:
            _reject_infinite(data, None, steps)
        yield map(_model_inputs, data), (cardinality if cardinality >= 0 else None)
    elif isinstance(data, keras.utils.PyDataset):
        _reject_batch_size(data, batch_size)
        adapter = get_data_adapter(data)
        _reject_infinite(data, adapter.num_batches, steps)
        adapter.on_epoch_begin()  # starts the workers, if any
        try:
            yield map(_model_inputs, adapter.get_numpy_iterator()), adapter.num_batches
        finally:
            adapter.on_epoch_end()
    elif isinstance(data, collections.abc.Iterator):
        _reject_batch_size(data, batch_size)
        yield map(_model_inputs, data), None
    elif array_data_adapter.can_convert_arrays((data,)):
        adapter = get_data_adapter(data, batch_size=batch_size or DEFAULT_BATCH_SIZE)
        yield map(_model_inputs, adapter.get_tf_dataset()), adapter.num_batches
    else:
        raise TypeError(
            "`data` must be arrays, a tf.data.Dataset, a Python generator or a "
            f"keras.utils.PyDataset. Received: data of type {type(data).__name__}"
        )


def _short(error):
    """The gist of an error. A TensorFlow runtime error carries the graph's whole Python stack
    before its last line, which says what went wrong (the full error stays chained)."""
    if not isinstance(error, tf.errors.OpError):
        return str(error)
    lines = [line.strip() for line in error.message.splitlines()]
    gist = [line for line in lines if line and not line.startswith("[[")]
    return gist[-1] if gist else error.message


def _describe_inputs(x):
    """Shapes of a batch's inputs, for error messages."""
    return tf.nest.map_structure(lambda t: tuple(np.shape(t)), x)


# --- the probe: training-mode BN that records its batch moments -----------------------------


# TensorFlow's own fused kernel (oneDNN on CPU, cuDNN on GPU) takes NHWC input in these dtypes,
# raises epsilon to at least 1.001e-5, and returns the batch variance Bessel-corrected.
_TF_FUSED_DTYPES = ("float16", "bfloat16", "float32")
_TF_FUSED_MIN_EPSILON = 1.001e-5


def _tf_fused_batch_norm(inputs, gamma, beta, epsilon):
    """Channels-last training BN by TensorFlow's fused kernel: (y, mean, σ² biased, count).

    Several times faster on CPU than `kernel.fused_batch_norm` for conv feature maps (1.7 ms
    against 6.5 ms for a (64, 32, 32, 32) map on the 2-core development machine), which makes
    the pass as cheap as `model.predict`. Any rank: the input is viewed as NHWC, with every
    non-channel axis in N when the rank is not 4 (a free reshape).
    """
    channels = inputs.shape[-1]
    nhwc = inputs if len(inputs.shape) == 4 else tf.reshape(inputs, [-1, 1, 1, channels])
    y, mean, corrected, *_ = tf.compat.v1.nn.fused_batch_norm(
        nhwc, tf.reshape(gamma, [-1]), tf.reshape(beta, [-1]), epsilon=epsilon, is_training=True
    )
    count = tf.cast(tf.reduce_prod(tf.shape(nhwc)[:3]), kernel.STATISTICS_DTYPE)
    # TensorFlow divides by max(m − 1, 1); undo it to get the biased σ² the update rule takes.
    variance = corrected * (tf.maximum(count - 1.0, 1.0) / count)
    return tf.reshape(y, tf.shape(inputs)), mean, variance, tf.fill([channels], count)


class _Probe:
    """Stands in for one BN layer's `call`: normalizes with the batch moments and records them.

    Works for both layer classes through the attributes they share (axis, epsilon, scale,
    center, gamma, beta). `records` receives (mean, variance, count) per call of the layer (a
    shared layer is called more than once per forward pass).
    """

    def __init__(self, layer):
        self.layer = layer
        self.records = []

    def __call__(self, inputs, training=None, mask=None):
        layer = self.layer
        # As the layers do: integer inputs are computed in float32, float64 stays float64.
        if not inputs.dtype.is_floating:
            inputs = tf.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        dtype = kernel.statistics_dtype(inputs.dtype)
        rank = len(inputs.shape)
        axes = normalize_axes(layer.axis, rank)
        keepdims_shape = [inputs.shape[a] if a in axes else 1 for a in range(rank)]
        gamma = kernel.per_channel(
            layer.gamma if layer.scale else None, 1.0, keepdims_shape, dtype
        )
        beta = kernel.per_channel(layer.beta if layer.center else None, 0.0, keepdims_shape, dtype)
        if self._tf_fused_applies(inputs, axes, mask):
            outputs, *moments = _tf_fused_batch_norm(inputs, gamma, beta, layer.epsilon)
        else:
            outputs, *moments = kernel.fused_batch_norm(
                inputs, gamma, beta, reduction_axes=reduction_axes(axes, rank),
                epsilon=layer.epsilon, weights=kernel.mask_weights(inputs, mask),
            )
        shape, stored = layer.moving_mean.shape, layer.moving_mean.dtype
        self.records.append(tuple(tf.cast(tf.reshape(t, shape), stored) for t in moments))
        # The statistics are of the BN's input; the next layer sees the output after a kerasbn
        # layer's activation, as in training.
        activate = getattr(layer, "_activate", None)
        if activate is not None:
            outputs = activate(outputs)
        return tf.cast(outputs, layer.compute_dtype)

    def _tf_fused_applies(self, inputs, axes, mask):
        # Otherwise (masks, channels not last, float64, a smaller epsilon): kerasbn's kernel.
        return (
            mask is None
            and axes == (len(inputs.shape) - 1,)
            and inputs.dtype.name in _TF_FUSED_DTYPES
            and self.layer.epsilon >= _TF_FUSED_MIN_EPSILON
        )


@contextlib.contextmanager
def _probes_installed(probes):
    """Replaces each layer's `call` by its probe (Keras looks `call` up on the instance)."""
    try:
        for probe in probes:
            # object.__setattr__: past Keras's attribute tracking, which must not see this.
            object.__setattr__(probe.layer, "call", probe)
        yield
    finally:
        for probe in probes:
            probe.layer.__dict__.pop("call", None)


# --- accumulators and the compiled step ------------------------------------------------------


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


class _CompiledPass:
    """The per-batch step for one model: forward pass with probes, then the pooled update."""

    def __init__(self, model, layers):
        # A weak reference: this object is cached per model and must not keep it alive.
        self._model = weakref.ref(model)
        self.layer_ids = tuple(id(layer) for layer in layers)
        self.probes = [_Probe(layer) for layer in layers]
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
        for probe in self.probes:
            probe.records.clear()  # they hold this trace's (or this eager call's) tensors
        self._model()(x, training=False)
        accepted = []
        candidates = []
        for probe, accumulator in zip(self.probes, self.accumulators, strict=True):
            state = accumulator.read()
            for record in probe.records:
                *state, ok = updates.population_update(*state, *record)
                accepted.append(ok)
            candidates.append(state)
        # All or nothing per batch: every layer is estimated from the same samples.
        batch_ok = tf.reduce_all(tf.stack(accepted)) if accepted else tf.constant(True)
        # Why a batch is skipped: m < 2 somewhere, or else non-finite statistics.
        counts = [record[2] for probe in self.probes for record in probe.records]
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
                f"inputs of shape {_describe_inputs(x)}"
            ) from error
        return bool(accepted), bool(too_small), int(size)

    def _check_shapes(self, x, index):
        """Every batch's inputs have the first batch's per-sample shapes, and those fit the
        model's declared inputs: the traced step relaxes shapes and would average a batch of
        another spatial size into the estimate."""
        shapes = [tuple(np.shape(t))[1:] for t in tf.nest.flatten(x)]
        if index == 0:
            self._first_batch = (shapes, _describe_inputs(x))
            self._check_declared_shapes(x, shapes)
        elif shapes != self._first_batch[0]:
            raise ValueError(
                f"Every batch must have the first batch's per-sample shape, but batch {index} "
                f"differs. Received: inputs of shape {_describe_inputs(x)} in batch {index}, "
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
                    f"shape {tuple(spec.shape)}\nReceived: inputs of shape {_describe_inputs(x)}"
                )


# Keyed weakly by model, so a model's traced step is reused across passes (the callback runs
# one per epoch) and forgotten with the model.
_PASS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_pass(model, layers):
    compiled = _PASS_CACHE.get(model)
    if compiled is None or compiled.layer_ids != tuple(id(layer) for layer in layers):
        compiled = _CompiledPass(model, layers)
        _PASS_CACHE[model] = compiled
    return compiled


# --- commit ----------------------------------------------------------------------------------


def _commit(accumulators):
    """Writes the estimates to the layers. Returns (updated names, unreached names)."""
    # Read everything first, so the writes below are all that happens to the layers.
    estimates = [(acc.layer, [v.numpy() for v in acc.variables]) for acc in accumulators]
    updated, unreached = [], []
    for layer, (mean, variance, count, dof) in estimates:
        if not np.any(count > 0):
            unreached.append(layer.name)
            continue
        layer.moving_mean.assign(mean)
        layer.moving_variance.assign(variance)
        # A renorm layer (Keras's or ours) derives its variance from `moving_stddev` at its next
        # training step: keep the two consistent.
        if getattr(layer, "renorm", False):
            layer.moving_stddev.assign(np.sqrt(variance + layer.epsilon))
        # A kerasbn layer in the population mode: later training batches pool with this pass.
        if getattr(layer, "population_count", None) is not None:
            layer.population_count.assign(count)
            layer.population_dof.assign(dof)
        updated.append(layer.name)
    return tuple(updated), tuple(unreached)


# --- the callback ----------------------------------------------------------------------------


class PopulationStatistics(keras.callbacks.Callback):
    """Runs `population_statistics(model, data, steps)` during `model.fit`.

    At the end of training, so that `model.evaluate`/`predict` after `fit` use population
    statistics; and with `every_n_epochs=n`, also at the end of every n-th epoch, *before* its
    validation (as detectron2's PreciseBN hook does), so the reported `val_` metrics of that
    epoch use them too. Keras validates inside the epoch, after the last training step, through
    `on_test_begin`: the pass runs there, or in `on_epoch_end` if the epoch has no validation.
    Put this callback before checkpointing callbacks so that they save the new statistics.
    With an optimizer using `use_ema=True`, fit ends by swapping the weights' moving averages in
    (before `on_train_end`): the final pass runs for those weights, even right after an
    `every_n_epochs` pass.

    Args:
        data: as for `population_statistics`; replayable (arrays, a `tf.data.Dataset`, a
            `PyDataset`) when it is used more than once. A generator is used up by one pass.
        steps: batches per pass, `None` for all of `data`.
        every_n_epochs: `None` (only at the end of training) or a positive integer.
        verbose: progress bar of each pass, 0 by default so as not to break fit's own.
        batch_size: for arrays, as in `population_statistics`.

    `reports` lists the `PopulationReport` of every pass.
    """

    def __init__(self, data, steps=None, every_n_epochs=None, *, verbose=0, batch_size=None):
        super().__init__()
        _check_steps(steps)
        _check_batch_size(batch_size)
        self._verbose = _check_verbose(verbose)
        if every_n_epochs is not None and not _is_positive_int(every_n_epochs):
            raise ValueError(
                "`every_n_epochs` must be a positive integer or None. Received: "
                f"every_n_epochs={every_n_epochs!r}"
            )
        if every_n_epochs is not None and isinstance(data, types.GeneratorType):
            raise ValueError(
                "A generator can be iterated only once, but `every_n_epochs` needs the data "
                "several times: pass arrays, a tf.data.Dataset or a keras.utils.PyDataset. "
                f"Received: a generator with every_n_epochs={every_n_epochs!r}"
            )
        self.data = data
        self.steps = steps
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.reports: list[PopulationReport] = []
        self._in_fit = False
        self._epoch = None
        self._pass_epoch = None  # epoch after whose training the last pass ran

    def _due(self, epoch):
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

    def _run_pass(self):
        self.reports.append(
            population_statistics(
                self.model, self.data, self.steps, self._verbose, batch_size=self.batch_size
            )
        )
        self._pass_epoch = self._epoch

    def on_train_begin(self, logs=None):
        self._in_fit = True
        self._epoch = None
        self._pass_epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_test_begin(self, logs=None):
        # Also called by a standalone evaluate(); only fit's validation is ours.
        if self._in_fit and self._epoch is not None and self._due(self._epoch):
            self._run_pass()

    def on_epoch_end(self, epoch, logs=None):
        if self._due(epoch) and self._pass_epoch != epoch:
            self._run_pass()

    def on_train_end(self, logs=None):
        self._in_fit = False
        # Skip a pass that would repeat the last one: no training step since, and no weight
        # swap. An optimizer with `use_ema=True` has just replaced the weights by their moving
        # averages (Keras's fit calls `finalize_variable_values` before `on_train_end`), so
        # the statistics must be those of the weights the model ends with.
        weights_swapped = bool(getattr(getattr(self.model, "optimizer", None), "use_ema", False))
        if self._pass_epoch is None or self._pass_epoch != self._epoch or weights_swapped:
            self._run_pass()
