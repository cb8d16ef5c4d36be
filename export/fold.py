"""The fold math, pure NumPy: merge an inference-mode BN into a linear layer's kernel and bias.

Inference BN is a fixed per-channel affine map (the paper's Algorithm 2, last step):

    BN(z) = s·z + t,   s = γ/√(var+ε),   t = β − mean·s

Folding backward, into the layer that produces z = x·w + b (its kernel w, bias b):

    BN(x·w + b) = x·w' + b',   w' = w·s (on w's output-channel axis),   b' = (b − mean)·s + β

Folding forward, into a Dense or a conv with padding="valid" that reads y = BN(x), with kernel
w of shape (*window, in_per_group, out) (a Dense kernel (in, out) has an empty window):

    conv(s·x + t, w) + b = conv(x, w') + b',   w'[…, j, o] = w[…, j, o]·s[c(j, o)],
    b'[o] = b[o] + Σ_window Σ_j w[…, j, o]·t[c(j, o)],   c(j, o) = group(o)·in_per_group + j

which holds only when every output sums over a full window of real inputs (no zero padding:
padding applied after the BN pads with 0, not with t).

Layouts. Where a kernel keeps its output channels is a parameter, `channel_axis`:
Dense (in, out) and Conv (*window, in/groups, out) keep them on -1; ConvTranspose
(*window, out, in) on -2; Depthwise (*window, in, multiplier) on (-2, -1), where output channel
c·multiplier + m is the row-major flattening of those two axes; SeparableConv folds into its
pointwise kernel (1…, in·multiplier, out), on -1.

Every function computes in float64 and returns arrays in the dtypes it was given (a missing
bias takes the kernel's dtype), so float32 weights stay float32 with one rounding.
"""

from __future__ import annotations

import numpy as np


def bn_affine(*, gamma, beta, mean, variance, epsilon):
    """(s, t), float64 vectors, such that inference BN is y = s·x + t per channel.

    `gamma` None means 1 (scale=False) and `beta` None means 0 (center=False).
    """
    gamma, beta, mean, scale = _scale(gamma, beta, mean, variance, epsilon)
    return scale, beta - mean * scale


def _scale(gamma, beta, mean, variance, epsilon):
    """(γ, β, mean, s = γ/√(var+ε)) as float64 vectors of one shape, γ and β filled in."""
    mean = _vector(mean, "mean")
    variance = _vector(variance, "variance")
    gamma = np.ones_like(mean) if gamma is None else _vector(gamma, "gamma")
    beta = np.zeros_like(mean) if beta is None else _vector(beta, "beta")
    shapes = {
        "gamma": gamma.shape, "beta": beta.shape, "mean": mean.shape, "variance": variance.shape
    }
    if len(set(shapes.values())) != 1:
        raise ValueError(
            f"BN statistics and parameters must have one shape. Received: shapes={shapes}"
        )
    return gamma, beta, mean, gamma / np.sqrt(variance + float(epsilon))


def fold(kernel, bias, *, gamma, beta, mean, variance, epsilon, channel_axis):
    """Fold a BN into the layer before it: returns (kernel', bias') with BN(layer(x)) = layer'(x).

    Args:
        kernel: the producer's kernel; its output channels live on `channel_axis`.
        bias: shape (channels,), or None for a layer without bias (a zero bias is made).
        gamma, beta, mean, variance: shape (channels,); gamma/beta may be None.
        epsilon: the BN's epsilon.
        channel_axis: an int, or a tuple of consecutive axes whose row-major flattening is the
            output channel (Depthwise: (-2, -1)).
    """
    kernel = np.asarray(kernel)
    axes = _channel_axes(channel_axis, kernel.ndim)
    channels = int(np.prod([kernel.shape[a] for a in axes]))
    gamma, beta, mean, scale = _scale(gamma, beta, mean, variance, epsilon)
    _check_channels(scale, channels, kernel.shape, channel_axis)
    bias, bias_dtype = _bias(bias, channels, kernel.dtype)
    per_channel_shape = [kernel.shape[a] if a in axes else 1 for a in range(kernel.ndim)]
    new_kernel = kernel.astype(np.float64) * scale.reshape(per_channel_shape)
    # (b − mean)·s + β rather than b·s + t: when |mean| ≫ |b − mean|, b·s and t nearly cancel.
    new_bias = (bias - mean) * scale + beta
    return _cast(new_kernel, kernel.dtype), _cast(new_bias, bias_dtype)


def fold_forward(kernel, bias, *, gamma, beta, mean, variance, epsilon, groups=1):
    """Fold a BN into the Dense or valid conv after it: layer(BN(x)) = layer'(x).

    Args:
        kernel: shape (*window, in_per_group, out): a Dense kernel (in, out) or a Keras conv
            kernel (channels_last or channels_first alike: the kernel layout is the same).
        bias: shape (out,), or None (a zero bias is made).
        gamma, beta, mean, variance: shape (in_per_group·groups,), the BN's channels, which are
            the layer's input channels; gamma/beta may be None.
        epsilon: the BN's epsilon.
        groups: the conv's `groups`; input channel c = group·in_per_group + j feeds only the
            outputs of its group.
    """
    kernel = np.asarray(kernel)
    if kernel.ndim < 2 or kernel.shape[-1] % groups:
        raise ValueError(
            "A forward-fold kernel has shape (*window, in_per_group, out) with out divisible "
            f"by groups. Received: kernel.shape={kernel.shape}, groups={groups!r}"
        )
    in_per_group, out = kernel.shape[-2:]
    scale, offset = bn_affine(gamma=gamma, beta=beta, mean=mean, variance=variance, epsilon=epsilon)
    _check_channels(scale, in_per_group * groups, kernel.shape, f"-2 (times groups={groups})")
    bias, bias_dtype = _bias(bias, out, kernel.dtype)
    # (in_per_group, out) matrices whose [j, o] entry is the BN's s or t for the input channel
    # that kernel[..., j, o] reads.
    group_of_output = np.arange(out) // (out // groups)
    scale_matrix = scale.reshape(groups, in_per_group)[group_of_output].T
    offset_matrix = offset.reshape(groups, in_per_group)[group_of_output].T
    wide_kernel = kernel.astype(np.float64)
    window_axes = tuple(range(kernel.ndim - 1))
    new_bias = bias + (wide_kernel * offset_matrix).sum(axis=window_axes)
    return _cast(wide_kernel * scale_matrix, kernel.dtype), _cast(new_bias, bias_dtype)


def _cast(values, dtype):
    # A value too large for `dtype` becomes inf without a warning: callers check finiteness
    # and say why in their own words (graph.py refuses such a fold).
    with np.errstate(over="ignore"):
        return values.astype(dtype)


def _vector(values, name):
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(
            f"`{name}` must be a vector, one value per channel. Received: {name}.shape="
            f"{values.shape}"
        )
    return values


def _bias(bias, channels, kernel_dtype):
    """(bias as float64, dtype to return it in): a missing bias is zeros of the kernel's dtype."""
    if bias is None:
        return np.zeros(channels), kernel_dtype
    bias = np.asarray(bias)
    if bias.shape != (channels,):
        raise ValueError(
            f"`bias` must have shape ({channels},), one value per output channel. Received: "
            f"bias.shape={bias.shape}"
        )
    return bias.astype(np.float64), bias.dtype


def _channel_axes(channel_axis, ndim):
    axes = (channel_axis,) if isinstance(channel_axis, (int, np.integer)) else tuple(channel_axis)
    if not axes or not all(-ndim <= a < ndim for a in axes):
        raise ValueError(
            f"`channel_axis` must name axes of a rank-{ndim} kernel. Received: "
            f"channel_axis={channel_axis!r}"
        )
    axes = tuple(a % ndim for a in axes)
    if axes != tuple(range(axes[0], axes[0] + len(axes))):
        raise ValueError(
            "`channel_axis` must be one axis or consecutive axes in order (their row-major "
            f"flattening is the channel). Received: channel_axis={channel_axis!r}"
        )
    return axes


def _check_channels(scale, channels, kernel_shape, channel_axis):
    if scale.shape != (channels,):
        raise ValueError(
            f"The BN has {scale.shape[0]} channels but the kernel has {channels} on axis "
            f"{channel_axis}. Received: kernel.shape={tuple(kernel_shape)}"
        )
