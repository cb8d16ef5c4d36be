"""The kernel's numbers against the float64 reference: moments, forward, backward, stability."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

from kerasbn import kernel
from tests import reference


@st.composite
def inputs_and_axes(draw, max_rank=5, channels_last_only=False):
    """An input of rank 2–5 with random location and scale, and normalized axes for it."""
    rank = draw(st.integers(2, max_rank))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank)))
    shape = (draw(st.integers(2, 6)),) + shape[1:]  # at least two samples per channel
    axes = (rank - 1,) if channels_last_only else draw(
        st.one_of(
            st.just((rank - 1,)),
            st.just((1,)),
            st.lists(st.integers(1, rank - 1), min_size=1, max_size=rank - 1, unique=True).map(
                lambda a: tuple(sorted(a))
            ),
        )
    )
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    location = draw(st.sampled_from([0.0, 3.0, -50.0]))
    scale = draw(st.sampled_from([0.5, 1.0, 20.0]))
    x = (location + scale * rng.standard_normal(shape)).astype(np.float32)
    channel_shape = tuple(shape[a] for a in axes)
    gamma = rng.uniform(0.5, 2.0, channel_shape).astype(np.float32)
    beta = rng.standard_normal(channel_shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    return x, axes, gamma, beta, dy


def _keepdims(values, ndim, axes):
    return tf.constant(reference.per_channel(values, ndim, axes), tf.float32)


def _run_fused(x, axes, gamma, beta, dy, epsilon, weights=None):
    red = reference.reduction_axes(x.ndim, axes)
    x_t = tf.constant(x)
    g_t = _keepdims(gamma, x.ndim, axes)
    b_t = _keepdims(beta, x.ndim, axes)
    with tf.GradientTape() as tape:
        tape.watch([x_t, g_t, b_t])
        y, mean, variance, count = kernel.fused_batch_norm(
            x_t, g_t, b_t, reduction_axes=red, epsilon=epsilon, weights=weights
        )
        loss = tf.reduce_sum(y * dy)
    dx, dgamma, dbeta = tape.gradient(loss, [x_t, g_t, b_t])
    channel_shape = gamma.shape
    return (
        y.numpy(), mean.numpy(), variance.numpy(), count.numpy(),
        dx.numpy(), dgamma.numpy().reshape(channel_shape), dbeta.numpy().reshape(channel_shape),
    )


def _scale_of(a):
    """A magnitude for relative comparison of a whole array (elementwise relative error is
    meaningless where values cross zero)."""
    return np.max(np.abs(a)) + 1e-30


def _dx_term_scale(x, gamma, dy, axes, epsilon, weights=None):
    """The size of the terms ∂ℓ/∂x is a difference of: γ/√(σ²+ε)·|g|. For small m the result
    is mostly cancellation (m = 2 gives x̂ = ±1), so float32 error is relative to these terms."""
    _, variance, _ = reference.moments(x, axes, weights)
    gamma = reference.per_channel(gamma, x.ndim, axes)
    return _scale_of(gamma / np.sqrt(variance + epsilon) * np.abs(dy))


@given(inputs_and_axes())
def test_forward_and_backward_match_float64_reference(case):
    x, axes, gamma, beta, dy = case
    epsilon = 1e-3
    y, mean, variance, count, dx, dgamma, dbeta = _run_fused(x, axes, gamma, beta, dy, epsilon)
    ref_y, ref_mean, ref_var, ref_m = reference.forward(x, gamma, beta, axes, epsilon)
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(x, gamma, dy, axes, epsilon)

    np.testing.assert_allclose(count, np.broadcast_to(ref_m, count.shape))
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5 * _scale_of(x))
    np.testing.assert_allclose(variance, ref_var, rtol=1e-4, atol=1e-6 * _scale_of(x) ** 2)
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4 * _scale_of(ref_y))
    dx_scale = _dx_term_scale(x, gamma, dy, axes, epsilon)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-3, atol=1e-5 * dx_scale)
    np.testing.assert_allclose(dgamma, ref_dgamma, rtol=1e-4, atol=1e-4 * _scale_of(ref_dgamma))
    np.testing.assert_allclose(dbeta, ref_dbeta, rtol=1e-4, atol=1e-5 * _scale_of(ref_dbeta))


@given(inputs_and_axes(max_rank=4, channels_last_only=True), st.integers(0, 2**31 - 1))
def test_masked_moments_and_gradients_match_reference(case, mask_seed):
    x, axes, gamma, beta, dy = case
    rng = np.random.default_rng(mask_seed)
    # A Keras-style mask: one flag per position, shared by the channels, at least two counted.
    weights = (rng.uniform(size=x.shape[:-1] + (1,)) < 0.6).astype(np.float32)
    flat = weights.reshape(-1)
    flat[:2] = 1.0
    epsilon = 1e-3
    y, mean, variance, count, dx, dgamma, dbeta = _run_fused(
        x, axes, gamma, beta, dy, epsilon, weights=tf.constant(weights)
    )
    ref_y, ref_mean, ref_var, ref_m = reference.forward(x, gamma, beta, axes, epsilon, weights)
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(x, gamma, dy, axes, epsilon, weights)
    np.testing.assert_allclose(count, np.broadcast_to(ref_m, count.shape))
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5 * _scale_of(x))
    np.testing.assert_allclose(variance, ref_var, rtol=1e-4, atol=1e-6 * _scale_of(x) ** 2)
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4 * _scale_of(ref_y))
    dx_scale = _dx_term_scale(x, gamma, dy, axes, epsilon, weights)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-3, atol=1e-5 * dx_scale)
    np.testing.assert_allclose(dgamma, ref_dgamma, rtol=1e-4, atol=1e-4 * _scale_of(ref_dgamma))
    np.testing.assert_allclose(dbeta, ref_dbeta, rtol=1e-4, atol=1e-5 * _scale_of(ref_dbeta))


def test_reference_backward_agrees_with_finite_differences():
    """The reference itself is checked: central differences of a float64 loss."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 2))
    gamma, beta = rng.uniform(0.5, 2, 2), rng.standard_normal(2)
    dy = rng.standard_normal(x.shape)
    weights = np.ones((4, 3, 1))
    weights[1, 2] = 0.0
    axes = (2,)

    def loss(x):
        return float((reference.forward(x, gamma, beta, axes, 1e-3, weights)[0] * dy).sum())

    dx = reference.backward(x, gamma, dy, axes, 1e-3, weights)[0]
    numeric = np.zeros_like(x)
    h = 1e-6
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = h
        numeric[index] = (loss(x + step) - loss(x - step)) / (2 * h)
    np.testing.assert_allclose(dx, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("location", [1e4, -1e4, 3e5])
def test_moments_are_stable_for_large_means(location):
    """Mean 1e4, std 0.1 in float32: E[x²]−E[x]² would give noise; the shifted pass gives the
    variance to 1e-3 relative (of the float32 data's own float64 variance)."""
    rng = np.random.default_rng(2)
    x = (location + 0.1 * rng.standard_normal((64, 7, 7, 3))).astype(np.float32)
    mean, variance, _ = kernel.batch_moments(tf.constant(x), (0, 1, 2))
    ref_mean, ref_var, _ = reference.moments(x, (3,))
    np.testing.assert_allclose(variance.numpy(), ref_var, rtol=1e-3)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-7)

    # The naive formula fails here, which is what makes this test able to fail.
    naive = np.mean(x * x, axis=(0, 1, 2)) - np.mean(x, axis=(0, 1, 2)) ** 2
    assert np.max(np.abs(naive - ref_var.reshape(-1)) / ref_var.reshape(-1)) > 1e-2


def test_training_output_is_accurate_for_large_means():
    """(x−μ)·s + β keeps y accurate where x·s + t would cancel catastrophically."""
    rng = np.random.default_rng(3)
    x = (1e4 + 0.1 * rng.standard_normal((256, 4))).astype(np.float32)
    gamma, beta = np.ones(4, np.float32), np.zeros(4, np.float32)
    y = _run_fused(x, (1,), gamma, beta, np.zeros_like(x), 1e-6)[0]
    ref_y = reference.forward(x, gamma, beta, (1,), 1e-6)[0]
    np.testing.assert_allclose(y, ref_y, atol=1e-3)


def test_constant_channel_has_zero_variance_not_negative():
    x = np.full((16, 3), 7.25, np.float32)
    _, variance, _ = kernel.batch_moments(tf.constant(x), (0,))
    assert np.all(variance.numpy() == 0.0)


def test_inference_affine_is_the_inference_transform():
    rng = np.random.default_rng(4)
    gamma, beta = rng.uniform(0.5, 2, 5), rng.standard_normal(5)
    mean, var = rng.standard_normal(5), rng.uniform(0.1, 3, 5)
    x = rng.standard_normal((8, 5))
    scale, offset = kernel.inference_affine(
        *(tf.constant(v, tf.float32) for v in (gamma, beta, mean, var)), 1e-3
    )
    y = x * scale.numpy() + offset.numpy()
    np.testing.assert_allclose(
        y, reference.inference(x, gamma, beta, mean, var, (1,), 1e-3), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("shape,axes", [
    ((37, 3, 5, 4), (3,)),        # rows not a multiple of the block: a tail block
    ((6, 4, 3, 5), (1,)),         # channels-first: normalized axis inside the rows
    ((5, 7, 6), (1, 2)),          # two normalized axes
    ((300, 8), (1,)),             # dense
])
def test_blockwise_sums_match_reference(monkeypatch, shape, axes):
    """Large tensors sum block by block in an XLA loop; force that path on small ones (and
    blocks of a few rows) and check moments, output and gradients against float64."""
    monkeypatch.setattr(kernel, "_BLOCKWISE_MIN_BYTES", 0)
    monkeypatch.setattr(kernel, "_BLOCK_BYTES", 4 * 64)
    rng = np.random.default_rng(5)
    x = (1e3 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
    channel_shape = tuple(shape[a] for a in axes)
    gamma = rng.uniform(0.5, 2.0, channel_shape).astype(np.float32)
    beta = rng.standard_normal(channel_shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, mean, variance, _, dx, dgamma, dbeta = _run_fused(x, axes, gamma, beta, dy, 1e-3)
    ref_y, ref_mean, ref_var, _ = reference.forward(x, gamma, beta, axes, 1e-3)
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(x, gamma, dy, axes, 1e-3)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
    np.testing.assert_allclose(variance, ref_var, rtol=1e-4)
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4 * _scale_of(ref_y))
    dx_scale = _dx_term_scale(x, gamma, dy, axes, 1e-3)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-3, atol=1e-5 * dx_scale)
    np.testing.assert_allclose(dgamma, ref_dgamma, rtol=1e-4, atol=1e-4 * _scale_of(ref_dgamma))
    np.testing.assert_allclose(dbeta, ref_dbeta, rtol=1e-4, atol=1e-5 * _scale_of(ref_dbeta))
