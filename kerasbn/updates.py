"""How one training batch changes the stored inference statistics.

Pure functions of per-channel tensors (float32, or float64 for a float64 layer): batch moments
(μ_B, biased σ²_B, m) in, new statistics out, plus `accepted`, a scalar bool. A batch whose
statistics are not finite (NaN or Inf in the input), or that cannot give an unbiased variance
(m < 2), is not accepted and leaves every statistic exactly as it was; the layer counts it.

Moving average (Keras's convention):   new = momentum·old + (1 − momentum)·batch

Population (the paper's Algorithm 2) over every accepted batch B since the last reset:

    mean     = Σ_B m_B·μ_B  / Σ_B m_B
    variance = Σ_B m_B·σ²_B / Σ_B (m_B − 1)

With equal batch sizes m these are exactly the paper's E_B[μ_B] and m/(m−1)·E_B[σ²_B]. With
unequal sizes every *value* weighs the same (a short last batch does not count as much as a
full one), and the variance is the pooled within-batch estimate, unbiased whatever the sizes.
They are kept as running convex combinations, weights old_count/new_count and m/new_count, so
no large sum is stored and the first batch after a reset replaces the old values exactly.

Batch Renormalization (Keras 3.14+'s rule) averages the standard deviation σ_B = √(σ²_B + ε)
rather than the variance, and derives the variance from it:

    stddev = momentum·stddev + (1 − momentum)·σ_B,   variance = max(stddev² − ε, 0)

for the inference statistics (`momentum`) and for the renorm statistics r and d are taken
against (`renorm_momentum`, no variance). σ²_B is unbiased first when `unbiased_variance`.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf


def _all_finite(*tensors):
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])


def degrees_of_freedom(count, dof=None):
    """m − 1, or the `dof` given (Σ_g (m_g − 1) for a batch pooled from ghost batches)."""
    return count - 1.0 if dof is None else dof


def unbiased(variance, count, dof=None):
    """m/(m−1)·σ²: Bessel's correction (infinite or NaN for m = 1, so rejected by the guard).

    With ghost batches, σ² is the mean within-group variance and m/dof the pooled correction.
    """
    return variance * (count / degrees_of_freedom(count, dof))


def moving_average_update(
    moving_mean, moving_variance, mean, variance, count, *, momentum, unbiased_variance,
    dof=None,
):
    """Returns (new_mean, new_variance, accepted)."""
    dof = degrees_of_freedom(count, dof)
    if unbiased_variance:
        variance = unbiased(variance, count, dof)
        accepted = tf.reduce_all(dof >= 1.0)
    else:
        accepted = tf.reduce_all(count >= 1.0)
    accepted &= _all_finite(mean, variance)
    new_mean = moving_mean * momentum + mean * (1.0 - momentum)
    new_variance = moving_variance * momentum + variance * (1.0 - momentum)
    return (
        tf.where(accepted, new_mean, moving_mean),
        tf.where(accepted, new_variance, moving_variance),
        accepted,
    )


def batch_stddev(variance, count, *, epsilon, unbiased_variance, dof=None):
    """σ_B = √(σ²_B + ε), with σ²_B unbiased first when `unbiased_variance` (not finite for
    m = 1, so the update guards reject it)."""
    if unbiased_variance:
        variance = unbiased(variance, count, dof)
    return tf.sqrt(variance + epsilon)


def renorm_moving_average_update(
    moving_mean, moving_stddev, moving_variance, mean, stddev, count, *, momentum, epsilon
):
    """Returns (new_mean, new_stddev, new_variance, accepted): the renorm rule above, for the
    batch's mean and `batch_stddev`."""
    new_mean, new_stddev, accepted = moving_average_update(
        moving_mean, moving_stddev, mean, stddev, count, momentum=momentum,
        unbiased_variance=False,
    )
    new_variance = tf.where(
        accepted, tf.nn.relu(tf.square(new_stddev) - epsilon), moving_variance
    )
    return new_mean, new_stddev, new_variance, accepted


def population_update(
    population_mean, population_variance, total_count, total_dof, mean, variance, count,
    dof=None,
):
    """Returns (new_mean, new_variance, new_total_count, new_total_dof, accepted).

    `total_count` is Σ m_B and `total_dof` is Σ (m_B − 1) over the batches accepted so far
    (a batch of ghost batches adds its `dof`, Σ_g (m_g − 1)).
    """
    dof = degrees_of_freedom(count, dof)
    accepted = _all_finite(mean, variance) & tf.reduce_all(dof >= 1.0)
    new_count = total_count + count
    new_dof = total_dof + dof
    new_mean = population_mean * (total_count / new_count) + mean * (count / new_count)
    new_variance = population_variance * (total_dof / new_dof) + variance * (count / new_dof)
    return (
        tf.where(accepted, new_mean, population_mean),
        tf.where(accepted, new_variance, population_variance),
        tf.where(accepted, new_count, total_count),
        tf.where(accepted, new_dof, total_dof),
        accepted,
    )


@dataclasses.dataclass(frozen=True)
class UpdateRule:
    """Every stored statistic's update from one batch, for one layer configuration.

    Hashable and compared by value, so that the compiled training forward can take it as a
    static argument and run the update inside its XLA cluster (`kernel.fused_batch_norm`'s
    `update`): the layer's per-step work outside the kernel is then only the variable writes.

    Attributes:
        statistics: "moving_average" or "population".
        momentum: of the moving averages.
        epsilon: the layer's ε.
        unbiased_variance: store m/(m−1)·σ²_B (moving averages; the population is unbiased).
        renorm_momentum: with Batch Renormalization, the renorm statistics' momentum; None
            without renorm.
    """

    statistics: str
    momentum: float
    epsilon: float
    unbiased_variance: bool
    renorm_momentum: float | None = None

    def __call__(self, state, mean, variance, count, dof=None):
        """(new state, accepted): all or none.

        `state` maps the layer's variable names (moving_mean, moving_variance, and with renorm
        moving_stddev, renorm_mean, renorm_stddev, in the population mode population_count and
        population_dof) to their current values; the moments may have any shape with as many
        elements (keepdims), and are brought to the state's shape and dtype. Every new value is
        the old one when the batch is not accepted. The counters, when in `state`, count too:
        `skipped_updates` adds one for a batch not accepted, `renorm_step` one for every batch.
        """
        like = state["moving_mean"]
        mean, variance, count = (_like(t, like) for t in (mean, variance, count))
        dof = None if dof is None else _like(dof, like)
        renorm = self.renorm_momentum is not None
        new = {}
        accepted = []
        # σ_B only for renorm, which averages it.
        stddev = None if not renorm else batch_stddev(
            variance, count, epsilon=self.epsilon, unbiased_variance=self.unbiased_variance,
            dof=dof,
        )
        if self.statistics == "population":
            *values, ok = population_update(
                state["moving_mean"], state["moving_variance"], state["population_count"],
                state["population_dof"], mean, variance, count, dof,
            )
            names = ("moving_mean", "moving_variance", "population_count", "population_dof")
            new.update(zip(names, values, strict=True))
            if renorm:
                new["moving_stddev"] = tf.sqrt(new["moving_variance"] + self.epsilon)
        elif renorm:
            *values, ok = renorm_moving_average_update(
                state["moving_mean"], state["moving_stddev"], state["moving_variance"],
                mean, stddev, count, momentum=self.momentum, epsilon=self.epsilon,
            )
            names = ("moving_mean", "moving_stddev", "moving_variance")
            new.update(zip(names, values, strict=True))
        else:
            *values, ok = moving_average_update(
                state["moving_mean"], state["moving_variance"], mean, variance, count,
                momentum=self.momentum, unbiased_variance=self.unbiased_variance, dof=dof,
            )
            new.update(zip(("moving_mean", "moving_variance"), values, strict=True))
        accepted.append(ok)
        if renorm:
            *values, ok = moving_average_update(
                state["renorm_mean"], state["renorm_stddev"], mean, stddev, count,
                momentum=self.renorm_momentum, unbiased_variance=False,
            )
            new.update(zip(("renorm_mean", "renorm_stddev"), values, strict=True))
            accepted.append(ok)
        accepted = tf.reduce_all(tf.stack(accepted))
        new = {name: tf.where(accepted, value, state[name]) for name, value in new.items()}
        if "skipped_updates" in state:
            skipped = state["skipped_updates"]
            new["skipped_updates"] = skipped + tf.cast(tf.logical_not(accepted), skipped.dtype)
        if "renorm_step" in state:
            new["renorm_step"] = state["renorm_step"] + 1
        return new, accepted


def _like(t, like):
    return tf.cast(tf.reshape(t, tf.shape(like)), like.dtype)
