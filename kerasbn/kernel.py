"""Pure tensor functions of batch normalization: moments, the transform and its backward pass.

Shapes. `x` has any rank. `reduction_axes` are the axes statistics are taken over (every axis
but the normalized ones). Per-channel tensors (gamma, beta, mean, variance, count) have x's rank
with size 1 on each reduction axis ("keepdims" shape), so they broadcast against x as they are.
Statistics are float32 whatever x's dtype (float16/bfloat16 inputs would overflow Σx²).

Forward, the paper's Algorithm 1, with m values per channel (m = N·H·W for conv outputs):

    μ = Σx/m,   σ² = Σ(x−μ)²/m  (biased),   y = γ·(x−μ)/√(σ²+ε) + β

Moments in one pass, shifted. The textbook E[x²]−E[x]² loses every digit when |μ| ≫ σ (for
μ = 1e4, σ = 0.1 in float32 it returns noise). With a per-channel reference value k taken from
the data (the channel's first sample), S1 = Σ(x−k) and S2 = Σ(x−k)² give μ = k + S1/m and
σ² = S2/m − (S1/m)², where the cancellation is only of size (μ−k)²/σ², a few units. XLA fuses
both sums into a single read of x. Nor is μ itself formed on the way to y: rounded to float32,
μ = 1e4 is off by up to 5e-4, which is 5e-3 in x̂ when σ = 0.1. The kernel uses
x − μ = (x − k) − δ with δ = S1/m, where x − k is exact (k is within a factor 2 of x).

Backward, the paper's chain rule in closed form, with g = ∂ℓ/∂y and x̂ = (x−μ)/√(σ²+ε):

    ∂ℓ/∂β = Σg,   ∂ℓ/∂γ = Σg·x̂,   ∂ℓ/∂x = γ/√(σ²+ε) · (g − (∂ℓ/∂β + x̂·∂ℓ/∂γ)/m)

two per-channel reductions (one fused read of g and x) and one elementwise pass; x̂ is
recomputed from x rather than stored, which saves a tensor of memory and its traffic.

Masks. With weights w ∈ {0, 1} (1 = counted) broadcastable to x, m = Σw and the moment sums
become Σw·(…). Every position is still normalized, so ∂ℓ/∂β and ∂ℓ/∂γ still sum over every
position, and the correction term of ∂ℓ/∂x is multiplied by w (derivation: ∂μ/∂x_i = w_i/m and
∂σ²/∂x_i = 2·w_i·(x_i−μ)/m).

The stages (`shifted_sums` → `moments_from_sums`; `gradient_sums` → `input_gradient`) are
separate functions so that a synchronized layer can all-reduce the sums between them.
"""

from __future__ import annotations

import tensorflow as tf

STATISTICS_DTYPE = tf.float32


def _as_statistics_dtype(x):
    return tf.cast(x, STATISTICS_DTYPE)


def reference_value(x, reduction_axes, weights=None):
    """A per-channel value close to the channel's data, used to shift the moment sums.

    Without a mask it is the channel's first sample. With a mask the first position may be
    padding far from the data, so it is the masked mean (one extra pass, masks only).
    """
    if weights is None:
        first = tuple(
            slice(0, 1) if a in reduction_axes else slice(None) for a in range(x.shape.rank)
        )
        return tf.stop_gradient(x[first])
    weights = tf.broadcast_to(weights, tf.shape(x))
    count = tf.reduce_sum(weights, reduction_axes, keepdims=True)
    total = tf.reduce_sum(weights * x, reduction_axes, keepdims=True)
    return tf.stop_gradient(tf.math.divide_no_nan(total, count))


def value_count(x, reduction_axes, weights=None):
    """m per channel: the number of (unmasked) values each statistic is taken over."""
    if weights is None:
        shape = tf.shape(x)
        m = tf.reduce_prod(tf.gather(shape, list(reduction_axes)))
        keepdims_shape = [1 if a in reduction_axes else shape[a] for a in range(x.shape.rank)]
        return tf.fill(keepdims_shape, tf.cast(m, STATISTICS_DTYPE))
    weights = tf.broadcast_to(weights, tf.shape(x))
    return tf.reduce_sum(weights, reduction_axes, keepdims=True)


def shifted_sums(x, shift, reduction_axes, weights=None):
    """Per-channel (S1, S2) = (Σw·(x−k), Σw·(x−k)²): the sums that add up across replicas."""
    d = x - shift
    if weights is not None:
        wd = weights * d
        return (
            tf.reduce_sum(wd, reduction_axes, keepdims=True),
            tf.reduce_sum(wd * d, reduction_axes, keepdims=True),
        )
    return (
        tf.reduce_sum(d, reduction_axes, keepdims=True),
        tf.reduce_sum(d * d, reduction_axes, keepdims=True),
    )


def centered_moments(count, sum_shifted, sum_sq_shifted):
    """(δ, σ²): the mean relative to the shift, δ = μ − k, and the biased variance.

    A channel with count 0 gets NaN moments.
    """
    shifted_mean = sum_shifted / count
    # Rounding can leave a tiny negative difference for a constant channel; a variance is >= 0.
    variance = tf.maximum(sum_sq_shifted / count - tf.square(shifted_mean), 0.0)
    return shifted_mean, variance


def moments_from_sums(shift, count, sum_shifted, sum_sq_shifted):
    """Mean and biased variance from shifted sums. A channel with count 0 gets NaN moments."""
    shifted_mean, variance = centered_moments(count, sum_shifted, sum_sq_shifted)
    return shift + shifted_mean, variance


def batch_moments(x, reduction_axes, weights=None):
    """(mean, biased variance, count) per channel, in float32, in one shifted pass over x."""
    x = _as_statistics_dtype(x)
    if weights is not None:
        weights = _as_statistics_dtype(weights)
    shift = reference_value(x, reduction_axes, weights)
    count = value_count(x, reduction_axes, weights)
    mean, variance = moments_from_sums(shift, count, *shifted_sums(x, shift, reduction_axes, weights))
    return mean, variance, count


def inverse_std(variance, epsilon):
    return tf.math.rsqrt(variance + epsilon)


def inference_affine(gamma, beta, mean, variance, epsilon):
    """(scale, offset) such that inference BN is y = x·scale + offset (the map export folds)."""
    scale = gamma * inverse_std(variance, epsilon)
    return scale, beta - mean * scale


def normalized(x, mean, inv_std, shift=0.0):
    """x̂ = ((x − shift) − mean)·inv_std in float32, where `mean` is relative to `shift`.

    Passing the reference value as `shift` and δ as `mean` keeps the digits a rounded μ loses.
    """
    return ((_as_statistics_dtype(x) - shift) - mean) * inv_std


def gradient_sums(dy, x, mean, inv_std, reduction_axes, *, shift=0.0):
    """Per-channel (Σg, Σg·x̂) = (∂ℓ/∂β, ∂ℓ/∂γ): the sums the backward pass needs.

    `mean` is relative to `shift` (see `normalized`).
    """
    g = _as_statistics_dtype(dy)
    x_hat = normalized(x, mean, inv_std, shift)
    return (
        tf.reduce_sum(g, reduction_axes, keepdims=True),
        tf.reduce_sum(g * x_hat, reduction_axes, keepdims=True),
    )


def input_gradient(
    dy, x, gamma, mean, inv_std, count, sum_g, sum_g_xhat, weights=None, *, shift=0.0
):
    """∂ℓ/∂x = γ/√(σ²+ε) · (g − w·(Σg + x̂·Σg·x̂)/m), in x's dtype.

    `mean` is relative to `shift` (see `normalized`).
    """
    g = _as_statistics_dtype(dy)
    x_hat = normalized(x, mean, inv_std, shift)
    correction = (sum_g + x_hat * sum_g_xhat) / count
    if weights is not None:
        correction = _as_statistics_dtype(weights) * correction
    return tf.cast(gamma * inv_std * (g - correction), x.dtype)


def _training_forward(x, gamma, beta, weights, *, reduction_axes, epsilon):
    x32 = _as_statistics_dtype(x)
    if weights is not None:
        weights = _as_statistics_dtype(weights)
    shift = reference_value(x32, reduction_axes, weights)
    count = value_count(x32, reduction_axes, weights)
    shifted_mean, variance = centered_moments(
        count, *shifted_sums(x32, shift, reduction_axes, weights)
    )
    inv_std = inverse_std(variance, epsilon)
    # x̂·γ + β rather than x·s + t: when |μ| ≫ σ, x·s and t are huge and cancel.
    y = normalized(x32, shifted_mean, inv_std, shift) * gamma + beta
    return tf.cast(y, x.dtype), shift, shifted_mean, variance, count


def _training_backward(
    dy, x, gamma, shift, shifted_mean, variance, count, weights, *, reduction_axes, epsilon
):
    inv_std = inverse_std(variance, epsilon)
    sum_g, sum_g_xhat = gradient_sums(
        dy, x, shifted_mean, inv_std, reduction_axes, shift=shift
    )
    dx = input_gradient(
        dy, x, gamma, shifted_mean, inv_std, count, sum_g, sum_g_xhat, weights, shift=shift
    )
    return dx, sum_g_xhat, sum_g


# One XLA cluster each for the forward and the backward pass, whether or not the caller's
# model is compiled with XLA (a nested jit function is inlined into an enclosing XLA cluster).
# No reduce_retracing: it relaxes shapes of different ranks to an unknown rank, and XLA compiles
# per concrete shape anyway, so relaxed traces would save nothing.
_compiled_forward = tf.function(_training_forward, jit_compile=True)
_compiled_backward = tf.function(_training_backward, jit_compile=True)


def fused_batch_norm(x, gamma, beta, *, reduction_axes, epsilon, weights=None):
    """Training-mode batch normalization with the closed-form backward pass.

    Args:
        x: input of any float dtype and rank.
        gamma, beta: float32, keepdims shape (size 1 on every reduction axis).
        reduction_axes: tuple of the axes statistics are taken over.
        epsilon: float added to the variance.
        weights: optional mask weights broadcastable to x (1 = counted).

    Returns:
        (y, mean, variance, count): y in x's dtype; the batch moments (biased variance) and the
        per-channel count m, float32 in keepdims shape. Gradients flow to x, gamma and beta
        through y only; the moments are statistics, not part of the differentiable output.
    """
    reduction_axes = tuple(reduction_axes)
    epsilon = float(epsilon)

    @tf.custom_gradient
    def _batch_norm(x, gamma, beta):
        y, shift, shifted_mean, variance, count = _compiled_forward(
            x, gamma, beta, weights, reduction_axes=reduction_axes, epsilon=epsilon
        )

        def grad(dy, *_unused_statistics_grads):
            return _compiled_backward(
                dy, x, gamma, shift, shifted_mean, variance, count, weights,
                reduction_axes=reduction_axes, epsilon=epsilon,
            )

        return (y, shift + shifted_mean, variance, count), grad

    y, mean, variance, count = _batch_norm(x, gamma, beta)
    return y, tf.stop_gradient(mean), tf.stop_gradient(variance), tf.stop_gradient(count)
