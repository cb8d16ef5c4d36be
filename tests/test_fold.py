"""The pure fold math against float64 references: the layer's own math in NumPy, then the BN.

The layer references below are written from each layer's definition (window loops over a
channels-last input), not from `fold`'s formula, so a wrong layout or a wrong bias term shows
up as a mismatch; the BN step is the shared float64 reference in `tests/reference.py`.
"""

import itertools
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kerasbn.export.fold import bn_affine, fold, fold_forward
from tests import reference

# --- float64 layer references (channels-last input (batch, *spatial, channels)) -------------------


def _windows(window, out_spatial, stride, dilation):
    """(offset, slices into the input picking that window tap for every output position)."""
    for offset in itertools.product(*(range(k) for k in window)):
        yield offset, tuple(
            slice(o * dilation, o * dilation + stride * (n - 1) + 1, stride)
            for o, n in zip(offset, out_spatial, strict=True)
        )


def _valid_size(size, k, stride, dilation):
    return (size - dilation * (k - 1) - 1) // stride + 1


def dense(x, kernel, bias):
    return x @ kernel + bias


def conv(x, kernel, bias, stride=1, dilation=1, groups=1):
    """Valid convolution; kernel (*window, in/groups, out); output o reads group o // (out/g)."""
    window, (in_per_group, out) = kernel.shape[:-2], kernel.shape[-2:]
    out_per_group = out // groups
    out_spatial = [
        _valid_size(n, k, stride, dilation) for n, k in zip(x.shape[1:-1], window, strict=True)
    ]
    y = np.zeros((x.shape[0], *out_spatial, out))
    for offset, taps in _windows(window, out_spatial, stride, dilation):
        patch = x[(slice(None), *taps)]
        for g in range(groups):
            ins = slice(g * in_per_group, (g + 1) * in_per_group)
            outs = slice(g * out_per_group, (g + 1) * out_per_group)
            y[..., outs] += patch[..., ins] @ kernel[offset][:, outs]
    return y + bias


def conv_transpose(x, kernel, bias, stride=1):
    """Valid transposed convolution; kernel (*window, out, in): input i spreads to i·stride + k."""
    window = kernel.shape[:-2]
    in_spatial = x.shape[1:-1]
    out_spatial = [(n - 1) * stride + k for n, k in zip(in_spatial, window, strict=True)]
    y = np.zeros((x.shape[0], *out_spatial, kernel.shape[-2]))
    for offset in itertools.product(*(range(k) for k in window)):
        taps = tuple(
            slice(o, o + stride * (n - 1) + 1, stride)
            for o, n in zip(offset, in_spatial, strict=True)
        )
        y[(slice(None), *taps)] += x @ kernel[offset].T
    return y + bias


def depthwise(x, kernel, bias, stride=1):
    """Valid depthwise convolution; kernel (*window, in, multiplier): out c·multiplier + m."""
    window, (channels, multiplier) = kernel.shape[:-2], kernel.shape[-2:]
    out_spatial = [_valid_size(n, k, stride, 1) for n, k in zip(x.shape[1:-1], window, strict=True)]
    y = np.zeros((x.shape[0], *out_spatial, channels, multiplier))
    for offset, taps in _windows(window, out_spatial, stride, 1):
        y += x[(slice(None), *taps)][..., None] * kernel[offset]
    return y.reshape(*y.shape[:-2], channels * multiplier) + bias


def separable(x, depthwise_kernel, pointwise_kernel, bias):
    """Depthwise (no bias), then the pointwise kernel (1…, in·multiplier, out)."""
    inner = depthwise(x, depthwise_kernel, 0.0)
    return inner @ pointwise_kernel.reshape(pointwise_kernel.shape[-2:]) + bias


# --- strategies -----------------------------------------------------------------------------------


@st.composite
def bn_parameters(draw, channels):
    """BN statistics and parameters, some of them missing, with small and large variances."""
    def vector(low, high):
        return hnp.arrays(np.float64, channels, elements=st.floats(low, high, width=32))

    return dict(
        gamma=draw(st.none() | vector(-3, 3)),
        beta=draw(st.none() | vector(-3, 3)),
        mean=draw(vector(-10, 10)),
        variance=draw(vector(0, 10)),
        epsilon=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
    )


@st.composite
def layer_case(draw, kind):
    """(layer_fn(x, kernel, bias), x, kernel, bias, channel_axis, out_channels) for one kind."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rank = draw(st.integers(1, 3 if kind == "conv" else 2))
    window = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    stride = draw(st.integers(1, 2))
    channels = draw(st.integers(1, 4))
    # Room for a full window at dilation 2 and at least one output.
    spatial = tuple(2 * k + draw(st.integers(0, 2)) for k in window)
    kernel_shape, layer_fn, channel_axis = _layout(draw, kind, window, channels, stride)
    x = rng.standard_normal((2, *spatial, channels))
    if kind == "dense":
        x = rng.standard_normal((2, 3, channels))
    kernel = rng.standard_normal(kernel_shape)
    out_channels = int(np.prod([kernel_shape[a] for a in np.atleast_1d(channel_axis)]))
    bias = draw(st.none() | st.just(rng.standard_normal(out_channels)))
    return layer_fn, x, kernel, bias, channel_axis, out_channels


def _layout(draw, kind, window, channels, stride):
    """(kernel shape, reference layer, where that kernel keeps its output channels)."""
    out = draw(st.integers(1, 4))
    if kind == "dense":
        return (channels, out), dense, -1
    if kind == "conv":
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0]))
        dilation = draw(st.integers(1, 2)) if stride == 1 else 1
        return (
            (*window, channels // groups, out * groups),
            lambda x, k, b: conv(x, k, b, stride, dilation, groups),
            -1,
        )
    if kind == "conv_transpose":
        return (*window, out, channels), lambda x, k, b: conv_transpose(x, k, b, stride), -2
    if kind == "depthwise":
        return (*window, channels, out), lambda x, k, b: depthwise(x, k, b, stride), (-2, -1)
    # separable: the fold touches the pointwise kernel only; the depthwise one is fixed here.
    multiplier = draw(st.integers(1, 2))
    depthwise_kernel = np.random.default_rng(1).standard_normal((*window, channels, multiplier))
    return (
        (*(1,) * len(window), channels * multiplier, out),
        lambda x, k, b: separable(x, depthwise_kernel, k, b),
        -1,
    )


def _bn(y, parameters):
    """The BN of the float64 reference, filling γ = 1 and β = 0 where the BN has none."""
    channels = y.shape[-1]
    gamma, beta = parameters["gamma"], parameters["beta"]
    return reference.inference(
        y,
        np.ones(channels) if gamma is None else gamma,
        np.zeros(channels) if beta is None else beta,
        parameters["mean"],
        parameters["variance"],
        (y.ndim - 1,),
        parameters["epsilon"],
    )


def _assert_close(actual, expected):
    # float64 both ways: only rounding separates them, relative to the output's size.
    scale = max(1.0, np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-9 * scale)


# --- backward fold: BN(layer(x)) == layer'(x) -----------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "conv", "conv_transpose", "depthwise", "separable"])
@given(data=st.data())
def test_fold_matches_layer_then_bn(kind, data):
    layer_fn, x, kernel, bias, channel_axis, out_channels = data.draw(layer_case(kind))
    parameters = data.draw(bn_parameters(out_channels))
    expected = _bn(layer_fn(x, kernel, 0.0 if bias is None else bias), parameters)

    new_kernel, new_bias = fold(kernel, bias, channel_axis=channel_axis, **parameters)

    _assert_close(layer_fn(x, new_kernel, new_bias), expected)


# --- forward fold: layer(BN(x)) == layer'(x) ------------------------------------------------


@st.composite
def forward_case(draw):
    """(layer_fn, x, kernel, bias, groups) for a Dense or a valid conv (any groups/stride)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    groups = draw(st.integers(1, 3))
    in_per_group, out_per_group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    channels, out = in_per_group * groups, out_per_group * groups
    bias = draw(st.none() | st.just(rng.standard_normal(out)))
    if draw(st.booleans()):
        x, kernel = rng.standard_normal((2, 3, channels)), rng.standard_normal((channels, out))
        return dense, x, kernel, bias, 1
    rank = draw(st.integers(1, 2))
    window = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    spatial = tuple(dilation * (k - 1) + 1 + draw(st.integers(0, 3)) for k in window)
    x = rng.standard_normal((2, *spatial, channels))
    kernel = rng.standard_normal((*window, in_per_group, out))
    return (lambda x, k, b: conv(x, k, b, stride, dilation, groups)), x, kernel, bias, groups


@given(data=st.data())
def test_fold_forward_matches_bn_then_layer(data):
    layer_fn, x, kernel, bias, groups = data.draw(forward_case())
    parameters = data.draw(bn_parameters(x.shape[-1]))
    expected = layer_fn(_bn(x, parameters), kernel, 0.0 if bias is None else bias)

    new_kernel, new_bias = fold_forward(kernel, bias, groups=groups, **parameters)

    _assert_close(layer_fn(x, new_kernel, new_bias), expected)


# --- the affine map itself ---------------------------------------------------------------------


@given(data=st.data(), channels=st.integers(1, 6))
def test_bn_affine_is_inference_bn(data, channels):
    parameters = data.draw(bn_parameters(channels))
    x = np.random.default_rng(channels).standard_normal((4, channels))

    scale, offset = bn_affine(**parameters)

    _assert_close(x * scale + offset, _bn(x, parameters))


def test_missing_gamma_and_beta_are_one_and_zero():
    kernel, bias = np.ones((2, 3)), np.arange(3.0)
    stats = dict(mean=np.array([1.0, 2.0, 3.0]), variance=np.array([4.0, 1.0, 0.25]), epsilon=0.0)

    missing = fold(kernel, bias, gamma=None, beta=None, channel_axis=-1, **stats)
    explicit = fold(kernel, bias, gamma=np.ones(3), beta=np.zeros(3), channel_axis=-1, **stats)

    for a, b in zip(missing, explicit, strict=True):
        np.testing.assert_array_equal(a, b)


# --- dtypes and arguments ---------------------------------------------------------------------


STATS = dict(
    gamma=np.array([2.0, 0.5], np.float32),
    beta=np.array([1.0, -1.0], np.float32),
    mean=np.array([0.5, 3.0], np.float32),
    variance=np.array([1.0, 4.0], np.float32),
    epsilon=1e-3,
)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_keeps_dtypes_and_makes_a_missing_bias(dtype, with_bias):
    kernel = np.ones((2, 2), dtype)
    bias = np.array([1.0, 2.0], np.float32) if with_bias else None

    new_kernel, new_bias = fold(kernel, bias, channel_axis=-1, **STATS)
    forward_kernel, forward_bias = fold_forward(kernel, bias, **STATS)

    for k in (new_kernel, forward_kernel):
        assert k.dtype == dtype
    expected_bias_dtype = np.float32 if with_bias else dtype
    assert new_bias.dtype == forward_bias.dtype == expected_bias_dtype
    assert new_bias.shape == (2,) and forward_bias.shape == (2,)


def test_statistics_are_keyword_only():
    with pytest.raises(TypeError):
        fold(np.ones((3, 2)), None, *STATS.values(), -1)  # positional mean/variance: refused


def test_channel_count_mismatch_names_the_shapes():
    with pytest.raises(ValueError, match=r"2 channels but the kernel has 5.*kernel.shape=\(3, 5\)"):
        fold(np.ones((3, 5)), None, channel_axis=-1, **STATS)


def test_bias_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"bias.shape=\(3,\)"):
        fold(np.ones((3, 2)), np.zeros(3), channel_axis=-1, **STATS)


@pytest.mark.parametrize("channel_axis", [(-1, -2), (0, 2), 3, ()])
def test_channel_axes_must_be_consecutive_axes_of_the_kernel(channel_axis):
    with pytest.raises(ValueError, match=re.escape(f"channel_axis={channel_axis!r}")):
        fold(np.ones((2, 2, 1)), None, channel_axis=channel_axis, **STATS)


def test_statistics_of_different_shapes_are_refused():
    stats = {**STATS, "variance": np.ones(3)}
    with pytest.raises(ValueError, match=r"'variance': \(3,\)"):
        bn_affine(**stats)


def test_forward_groups_must_divide_the_outputs():
    with pytest.raises(ValueError, match=r"kernel.shape=\(2, 1, 3\), groups=2"):
        fold_forward(np.ones((2, 1, 3)), None, groups=2, **STATS)
