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


def renorm(x, gamma, beta, dy, axes, epsilon, renorm_mean, renorm_stddev,
           rmin=0.0, rmax=np.inf, dmax=np.inf, weights=None):
    """Batch Renormalization (Ioffe, 2017) in training mode, as Keras 3.14+ defines it:

        σ_B = √(σ²_B + ε),  σ = max(renorm_stddev, √ε),
        r = clip(σ_B/σ, rmin, rmax),  d = clip((μ_B − μ)/σ, −dmax, dmax),
        y = γ·(r·x̂ + d) + β

    r and d are constants of the step (no gradient through them), so ∂ℓ/∂x is plain BN's with
    γ·r for γ, and ∂ℓ/∂γ = Σ g·(r·x̂ + d). Returns (y, dx, dγ, dβ, r, d), r and d per channel
    in keepdims shape.
    """
    x = np.asarray(x, np.float64)
    mean, variance, _ = moments(x, axes, weights)
    shape = lambda v: per_channel(np.asarray(v, np.float64), x.ndim, axes)  # noqa: E731
    sigma = np.maximum(shape(renorm_stddev), np.sqrt(epsilon))
    r = np.clip(np.sqrt(variance + epsilon) / sigma, rmin, rmax)
    d = np.clip((mean - shape(renorm_mean)) / sigma, -dmax, dmax)
    x_hat = (x - mean) / np.sqrt(variance + epsilon)
    y = shape(gamma) * (r * x_hat + d) + shape(beta)
    gamma_r = np.reshape(shape(gamma) * r, np.shape(gamma))
    dx, _, d_beta = backward(x, gamma_r, dy, axes, epsilon, weights)
    red = reduction_axes(x.ndim, axes)
    d_gamma = (np.asarray(dy, np.float64) * (r * x_hat + d)).sum(red)
    return y, dx, d_gamma, d_beta, r, d


def ghost_batches(x, gamma, beta, dy, axes, epsilon, virtual_batch_size):
    """Ghost batch normalization: each group of `virtual_batch_size` consecutive samples is a
    batch of its own (forward and backward), γ and β shared. Returns (y, dx, dγ, dβ, mean,
    variance, m, dof): the batch statistics pooled from the groups as the layer stores them,
    mean = Σ m_g μ_g / Σ m_g, variance = Σ m_g σ²_g / Σ m_g (biased), m = Σ m_g,
    dof = Σ (m_g − 1), all per channel (flattened)."""
    x = np.asarray(x, np.float64)
    outputs = []
    for start in range(0, len(x), virtual_batch_size):
        group = slice(start, start + virtual_batch_size)
        y, mean, variance, m = forward(x[group], gamma, beta, axes, epsilon)
        dx, d_gamma, d_beta = backward(x[group], gamma, dy[group], axes, epsilon)
        outputs.append((y, dx, d_gamma, d_beta, mean, variance, m))
    y, dx = (np.concatenate([o[i] for o in outputs]) for i in (0, 1))
    d_gamma, d_beta = (sum(o[i] for o in outputs) for i in (2, 3))
    means, variances, counts = (np.stack([o[i].reshape(-1) for o in outputs]) for i in (4, 5, 6))
    total = counts.sum(0)
    return (
        y, dx, d_gamma, d_beta, (counts * means).sum(0) / total,
        (counts * variances).sum(0) / total, total, (counts - 1).sum(0),
    )


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# name → (f, f′) in float64, written from the definitions (Keras's docs), kinks as TensorFlow's
# gradients take them: relu′(0) = 0, relu6′ = 1 on the open interval (0, 6).
ACTIVATIONS = {
    "relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(np.float64)),
    "relu6": (
        lambda z: np.clip(z, 0.0, 6.0),
        lambda z: ((z > 0) & (z < 6)).astype(np.float64),
    ),
    "sigmoid": (_sigmoid, lambda z: _sigmoid(z) * (1.0 - _sigmoid(z))),
    "silu": (
        lambda z: z * _sigmoid(z),
        lambda z: _sigmoid(z) + z * _sigmoid(z) * (1 - _sigmoid(z)),
    ),
    # hard_silu(z) = 0 for z <= −3, z for z >= 3, z·(z + 3)/6 between.
    "hard_silu": (
        lambda z: np.where(z <= -3, 0.0, np.where(z >= 3, z, z * (z + 3) / 6)),
        lambda z: np.where(z <= -3, 0.0, np.where(z >= 3, 1.0, (2 * z + 3) / 6)),
    ),
}


def activated(x, gamma, beta, dy, axes, epsilon, activation, weights=None):
    """Training-mode BN followed by an activation f: a = f(z), z = BN(x). The chain rule gives
    ∂ℓ/∂z = dy·f′(z), then BN's backward. Returns (a, dx, dγ, dβ)."""
    f, derivative = ACTIVATIONS[activation]
    z, *_ = forward(x, gamma, beta, axes, epsilon, weights)
    dz = np.asarray(dy, np.float64) * derivative(z)
    return (f(z), *backward(x, gamma, dz, axes, epsilon, weights))
