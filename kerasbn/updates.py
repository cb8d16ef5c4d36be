"""How one training batch changes the stored inference statistics.

Pure functions of per-channel float32 tensors: batch moments (μ_B, biased σ²_B, m) in, new
statistics out, plus `accepted`, a scalar bool. A batch whose statistics are not finite (NaN or
Inf in the input), or that cannot give an unbiased variance (m < 2), is not accepted and leaves
every statistic exactly as it was; the layer counts it.

Moving average (Keras's convention):   new = momentum·old + (1 − momentum)·batch

Population (the paper's Algorithm 2) over every accepted batch B since the last reset:

    mean     = Σ_B m_B·μ_B  / Σ_B m_B
    variance = Σ_B m_B·σ²_B / Σ_B (m_B − 1)

With equal batch sizes m these are exactly the paper's E_B[μ_B] and m/(m−1)·E_B[σ²_B]. With
unequal sizes every *value* weighs the same (a short last batch does not count as much as a
full one), and the variance is the pooled within-batch estimate, unbiased whatever the sizes.
They are kept as running convex combinations, weights old_count/new_count and m/new_count, so
no large sum is stored and the first batch after a reset replaces the old values exactly.
"""

from __future__ import annotations

import tensorflow as tf


def _all_finite(*tensors):
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])


def unbiased(variance, count):
    """m/(m−1)·σ²: Bessel's correction (infinite or NaN for m = 1, so rejected by the guard)."""
    return variance * (count / (count - 1.0))


def moving_average_update(
    moving_mean, moving_variance, mean, variance, count, *, momentum, unbiased_variance
):
    """Returns (new_mean, new_variance, accepted)."""
    if unbiased_variance:
        variance = unbiased(variance, count)
    least_count = 2.0 if unbiased_variance else 1.0
    accepted = _all_finite(mean, variance) & tf.reduce_all(count >= least_count)
    new_mean = moving_mean * momentum + mean * (1.0 - momentum)
    new_variance = moving_variance * momentum + variance * (1.0 - momentum)
    return (
        tf.where(accepted, new_mean, moving_mean),
        tf.where(accepted, new_variance, moving_variance),
        accepted,
    )


def population_update(
    population_mean, population_variance, total_count, total_dof, mean, variance, count
):
    """Returns (new_mean, new_variance, new_total_count, new_total_dof, accepted).

    `total_count` is Σ m_B and `total_dof` is Σ (m_B − 1) over the batches accepted so far.
    """
    accepted = _all_finite(mean, variance) & tf.reduce_all(count >= 2.0)
    new_count = total_count + count
    new_dof = total_dof + (count - 1.0)
    new_mean = population_mean * (total_count / new_count) + mean * (count / new_count)
    new_variance = population_variance * (total_dof / new_dof) + variance * (count / new_dof)
    return (
        tf.where(accepted, new_mean, population_mean),
        tf.where(accepted, new_variance, population_variance),
        tf.where(accepted, new_count, total_count),
        tf.where(accepted, new_dof, total_dof),
        accepted,
    )
