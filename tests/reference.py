"""Float64 NumPy reference of batch normalization, written from the paper, not from our code.

The backward pass here is the paper's original chain rule (∂ℓ/∂x̂, ∂ℓ/∂σ², ∂ℓ/∂μ, then ∂ℓ/∂x),
not the simplified closed form the kernel uses, so the two derivations check each other. Masks
enter as weights w ∈ {0, 1}: statistics over counted positions, every position normalized.
"""

import numpy as np


def reduction_axes(ndim, axes):
    return tuple(a for a in range(ndim) if a not in axes)


def per_channel(values, ndim, axes):
    """Reshape a parameter of the normalized axes' shape to broadcast against the input."""
    shape = [1] * ndim
    for a, size in zip(axes, np.shape(values), strict=True):
        shape[a] = size
    return np.reshape(values, shape)


def moments(x, axes, weights=None):
    """(mean, biased variance, count m) in keepdims shape, float64."""
    x = np.asarray(x, np.float64)
    red = reduction_axes(x.ndim, axes)
    w = np.ones_like(x) if weights is None else np.broadcast_to(weights, x.shape).astype(np.float64)
    m = w.sum(red, keepdims=True)
    mean = (w * x).sum(red, keepdims=True) / m
    variance = (w * (x - mean) ** 2).sum(red, keepdims=True) / m
    return mean, variance, m


def forward(x, gamma, beta, axes, epsilon, weights=None):
    """Training-mode BN (Algorithm 1): y and the batch moments."""
    x = np.asarray(x, np.float64)
    mean, variance, m = moments(x, axes, weights)
    x_hat = (x - mean) / np.sqrt(variance + epsilon)
    y = per_channel(gamma, x.ndim, axes) * x_hat + per_channel(beta, x.ndim, axes)
    return y, mean, variance, m


def inference(x, gamma, beta, mean, variance, axes, epsilon):
    x = np.asarray(x, np.float64)
    shape = lambda v: per_channel(np.asarray(v, np.float64), x.ndim, axes)  # noqa: E731
    return shape(gamma) * (x - shape(mean)) / np.sqrt(shape(variance) + epsilon) + shape(beta)


def backward(x, gamma, dy, axes, epsilon, weights=None):
    """(∂ℓ/∂x, ∂ℓ/∂γ, ∂ℓ/∂β) by the paper's chain rule, generalized to mask weights."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    red = reduction_axes(x.ndim, axes)
    w = np.ones_like(x) if weights is None else np.broadcast_to(weights, x.shape).astype(np.float64)
    mean, variance, m = moments(x, axes, weights)
    g = per_channel(gamma, x.ndim, axes)
    std_inv = 1.0 / np.sqrt(variance + epsilon)
    x_hat = (x - mean) * std_inv
    d_xhat = dy * g
    d_var = (d_xhat * (x - mean) * -0.5 * std_inv**3).sum(red, keepdims=True)
    d_mean = (d_xhat * -std_inv).sum(red, keepdims=True) + d_var * (
        -2.0 * w * (x - mean)
    ).sum(red, keepdims=True) / m
    dx = d_xhat * std_inv + d_var * 2.0 * w * (x - mean) / m + d_mean * w / m
    d_gamma = (dy * x_hat).sum(red)
    d_beta = dy.sum(red)
    return dx, d_gamma, d_beta


def unbiased(variance, m):
    return variance * m / (m - 1.0)
