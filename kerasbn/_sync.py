"""Synchronized training-mode batch normalization: statistics over the global batch.

Under a `tf.distribute` strategy with R replicas, replica r holds a slice x_r of the global
batch with m_r values per channel. Synchronized BN normalizes every slice with the moments of
the whole batch, m = Σ_r m_r:

    μ = Σ_r Σ x_r / m,   σ² = Σ_r Σ (x_r − μ)² / m,   y_r = γ·(x_r − μ)/√(σ²+ε) + β

Forward: two SUM all-reduces per call, each of one stacked per-channel tensor.

1. [m_r·k_r, m_r], k_r the replica's reference value (`kernel.reference_value`), gives the
   global count m and a common shift k = Σ_r m_r·k_r / m.
2. [S1_r, S2_r] = [Σ(x_r−k), Σ(x_r−k)²], shifted by that k, gives μ and σ² through
   `kernel.centered_moments`, exactly as on one device.

Why a common shift, and why this one. Shifted sums only add up across replicas if every
replica subtracts the same k. k is a count-weighted mean of values taken from the data (a first
sample, or a masked mean), so it is as close to μ as the non-synchronized kernel's own
reference: the cancellation in σ² = S2/m − (S1/m)² stays of size (μ−k)²/σ², a few units, for
μ = 1e4 and σ = 0.1 as for μ = 0. Weighting by m_r keeps a replica whose local batch is empty
or fully masked (k_r = 0, m_r = 0) from pulling k towards 0. Every replica gets the same bits
of k because an all-reduce hands the same result to all of them. The alternative without the
first collective, per-replica shifts converted to a common one afterwards, reintroduces the
cancellation: Σ_r m_r·k_r² − m·k² loses every digit when |k| ≫ σ; merging per-replica
(m_r, μ_r, M2_r) stably (Chan et al.) needs all of them on every replica, an all-gather of R
times the data; the stored moving mean, common to all replicas for free, starts at 0 (or
whatever was loaded) and lags the data, so it bounds nothing. The first collective moves 2·C
floats: it costs a latency, not bandwidth.

Backward: one SUM all-reduce of [Σ_r g, Σ_r g·x̂] (x̂ from the global moments). ∂ℓ/∂x needs the
global sums (the kernel's closed form with m the global count):

    ∂ℓ/∂x_r = γ/√(σ²+ε) · (g_r − w·(Σg + x̂_r·Σg·x̂)/m)

while ∂ℓ/∂β and ∂ℓ/∂γ are returned as the replica's own sums Σ_r g and Σ_r g·x̂: the strategy
adds the replicas' variable gradients when the optimizer applies them, which gives the global
sums; returning the all-reduced sums would count them R times.

XLA. A collective cannot be compiled into an XLA cluster on CPU under `MirroredStrategy`
(TensorFlow 2.21: "Trying to access resource … located in device CPU:1 from device CPU:0",
whether the jit function is inside or around `strategy.run`; the same error stops
`model.fit(jit_compile=True)` under a multi-device strategy for any Keras model). So each local
stage between two collectives is its own `tf.function(jit_compile=True)`, placed on its
replica's device, and the collectives run between them.
"""

from __future__ import annotations

import tensorflow as tf

from kerasbn import kernel


def synchronizing_replica_context():
    """The replica context to all-reduce in, or None when there is nothing to synchronize.

    None without a strategy (the default replica context has one replica), with a one-replica
    strategy, and in a cross-replica context, where the caller sees the whole batch itself.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def _all_reduce_sum(context, tensors):
    """Σ over replicas of several same-shaped tensors, as one collective."""
    return tf.unstack(context.all_reduce(tf.distribute.ReduceOp.SUM, tf.stack(tensors)))


def _statistics_inputs(x, weights):
    dtype = kernel.statistics_dtype(x.dtype)  # float64 stays float64, as in the kernel
    x = tf.cast(x, dtype)
    if weights is not None:
        weights = tf.cast(weights, dtype)
    return x, weights


# --- the local stages, each one XLA cluster on its replica's device ---------------------------


def _weighted_reference(x, weights, *, reduction_axes):
    """(m_r·k_r, m_r) per channel, in keepdims shape."""
    x, weights = _statistics_inputs(x, weights)
    count = kernel.value_count(x, reduction_axes, weights)
    reference = kernel.reference_value(x, reduction_axes, weights)
    # The sum runs over the reference's single position; it exists for an empty local batch,
    # whose reference slice has size 0 and would otherwise not have the keepdims shape.
    return tf.reduce_sum(count * reference, reduction_axes, keepdims=True), count


def _local_shifted_sums(x, shift, weights, *, reduction_axes):
    x, weights = _statistics_inputs(x, weights)
    return kernel.shifted_sums(x, shift, reduction_axes, weights)


def _normalize(x, gamma, beta, shift, count, sum_shifted, sum_sq_shifted, *, epsilon):
    """y and the moments, from the global sums: (y, δ = μ − k, σ², 1/√(σ²+ε))."""
    shifted_mean, variance = kernel.centered_moments(count, sum_shifted, sum_sq_shifted)
    inv_std = kernel.inverse_std(variance, epsilon)
    y = kernel.normalized(x, shifted_mean, inv_std, shift) * gamma + beta
    return tf.cast(y, x.dtype), shifted_mean, variance, inv_std


_compiled_weighted_reference = tf.function(_weighted_reference, jit_compile=True)
_compiled_local_shifted_sums = tf.function(_local_shifted_sums, jit_compile=True)
_compiled_normalize = tf.function(_normalize, jit_compile=True)
_compiled_gradient_sums = tf.function(kernel.gradient_sums, jit_compile=True)
_compiled_input_gradient = tf.function(kernel.input_gradient, jit_compile=True)


def synchronized_batch_norm(
    x, gamma, beta, *, reduction_axes, epsilon, weights=None, replica_context
):
    """`kernel.fused_batch_norm` with moments over the global batch of `replica_context`.

    Same arguments and returns as `kernel.fused_batch_norm`, plus the replica context whose
    replicas share the batch. The returned count is the global m, the moments are the global
    batch's (identical on every replica, so every replica's statistics update is the same).
    Must be called, and differentiated, in that replica context by every replica.
    """
    reduction_axes = tuple(reduction_axes)
    epsilon = float(epsilon)

    @tf.custom_gradient
    def _batch_norm(x, gamma, beta):
        weighted_reference, count = _all_reduce_sum(
            replica_context,
            _compiled_weighted_reference(x, weights, reduction_axes=reduction_axes),
        )
        shift = tf.math.divide_no_nan(weighted_reference, count)
        sums = _all_reduce_sum(
            replica_context,
            _compiled_local_shifted_sums(x, shift, weights, reduction_axes=reduction_axes),
        )
        y, shifted_mean, variance, inv_std = _compiled_normalize(
            x, gamma, beta, shift, count, *sums, epsilon=epsilon
        )

        def grad(dy, *_unused_statistics_grads):
            local_sum_g, local_sum_g_xhat = _compiled_gradient_sums(
                dy, x, shifted_mean, inv_std, reduction_axes, shift=shift
            )
            sum_g, sum_g_xhat = _all_reduce_sum(
                replica_context, [local_sum_g, local_sum_g_xhat]
            )
            dx = _compiled_input_gradient(
                dy, x, gamma, shifted_mean, inv_std, count, sum_g, sum_g_xhat, weights,
                shift=shift,
            )
            return dx, local_sum_g_xhat, local_sum_g

        return (y, shift + shifted_mean, variance, count), grad

    y, mean, variance, count = _batch_norm(x, gamma, beta)
    return y, tf.stop_gradient(mean), tf.stop_gradient(variance), tf.stop_gradient(count)


def select_batch_norm(synchronized):
    """The training kernel for a layer: `kernel.fused_batch_norm`, or the synchronized one
    bound to the current replica context when `synchronized` and there are several replicas.

    Without a strategy or with one replica, `synchronized=True` is exactly the fused path.
    """
    context = synchronizing_replica_context() if synchronized else None
    if context is None:
        return kernel.fused_batch_norm

    def batch_norm(x, gamma, beta, *, reduction_axes, epsilon, weights=None):
        return synchronized_batch_norm(
            x, gamma, beta, reduction_axes=reduction_axes, epsilon=epsilon, weights=weights,
            replica_context=context,
        )

    return batch_norm
