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

This module checks the arguments, runs the pass and reports. The parts, one job each:
`population_data` turns `data` into batches of model inputs; `population_forward` runs the
model with every BN layer normalizing with its batch moments and reporting them (a hook on
kerasbn's layer, the model's graph for Keras's); `population_estimate` pools the moments per
batch, all layers or none, and commits the estimate once the whole pass succeeded (atomic);
`callbacks.PopulationStatistics` runs the pass during `fit`.
"""

from __future__ import annotations

import dataclasses
import itertools

import keras
import numpy as np

from kerasbn.population_data import check_data, model_input_batches
from kerasbn.population_estimate import commit, population_pass
from kerasbn.population_forward import batch_norm_layers

_VERBOSE_VALUES = ("auto", 0, 1, 2)


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
            `keras.layers.BatchNormalization` layers. kerasbn's layer is estimated wherever it
            is called; Keras's where a Sequential or Functional graph calls it, at any depth,
            not from a subclassed model's or layer's own `call` (see `population_forward`).
        data: the model's inputs, as `model.predict` takes them: NumPy arrays or tensors (a
            list/tuple/dict of them for several inputs), batched by `batch_size`; or a
            `tf.data.Dataset`, a Python generator/iterator or a `keras.utils.PyDataset` of
            batches (read in order in this process; see `population_data`). Batches may be
            `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`: only `x` is used.
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
        ValueError: empty data, no trainable BN layer, a Keras BN layer no graph calls (before
            any batch runs), `steps` <= 0, data that does not fit
            the model, a batch whose per-sample shape differs from the first batch's (checked
            before the batch runs; the layers are only written after the whole pass), or no
            usable batch (the message says how many had m < 2 and how many were non-finite).
        TypeError: `model` is not a Keras model, or `data` is None or of an unsupported type.
    """
    check_steps(steps)
    verbose = check_verbose(verbose)
    check_batch_size(batch_size)
    check_data(data)
    estimated, frozen, unbuilt = batch_norm_layers(model)
    compiled = population_pass(model, estimated)
    with model_input_batches(data, batch_size, steps) as (batches, num_batches):
        target = num_batches if steps is None else steps
        progbar = keras.utils.Progbar(target, verbose=verbose, stateful_metrics=["skipped"])
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
    updated, unreached = commit(compiled.accumulators)
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


def is_positive_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def check_steps(steps):
    if steps is not None and not is_positive_int(steps):
        raise ValueError(f"`steps` must be a positive integer or None. Received: steps={steps!r}")


def check_batch_size(batch_size):
    if batch_size is not None and not is_positive_int(batch_size):
        raise ValueError(
            f"`batch_size` must be a positive integer or None. Received: batch_size={batch_size!r}"
        )


def check_verbose(verbose):
    if isinstance(verbose, bool) or verbose not in _VERBOSE_VALUES:
        raise ValueError(
            f"`verbose` must be one of {_VERBOSE_VALUES}. Received: verbose={verbose!r}"
        )
    # As model.fit does: "auto" is the progress bar.
    return 1 if verbose == "auto" else verbose
