"""The kernel's numbers against the float64 reference: moments, forward, backward, stability."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
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


def _run_fused(x, axes, gamma, beta, dy, epsilon, weights=None, activation=None):
    red = reference.reduction_axes(x.ndim, axes)
    x_t = tf.constant(x)
    g_t = _keepdims(gamma, x.ndim, axes)
    b_t = _keepdims(beta, x.ndim, axes)
    with tf.GradientTape() as tape:
        tape.watch([x_t, g_t, b_t])
        y, mean, variance, count = kernel.fused_batch_norm(
            x_t, g_t, b_t, reduction_axes=red, epsilon=epsilon, weights=weights,
            activation=activation,
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


ACTIVATIONS = sorted(reference.ACTIVATIONS)


def _assert_activated_matches_reference(x, axes, gamma, beta, dy, activation, weights=None):
    epsilon = 1e-3
    y, _, _, _, dx, dgamma, dbeta = _run_fused(
        x, axes, gamma, beta, dy, epsilon,
        weights=None if weights is None else tf.constant(weights), activation=activation,
    )
    ref_y, ref_dx, ref_dgamma, ref_dbeta = reference.activated(
        x, gamma, beta, dy, axes, epsilon, activation, weights
    )
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4 * _scale_of(ref_y))
    dx_scale = _dx_term_scale(x, gamma, dy, axes, epsilon, weights)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-3, atol=1e-5 * dx_scale)
    np.testing.assert_allclose(dgamma, ref_dgamma, rtol=1e-4, atol=1e-4 * _scale_of(ref_dgamma))
    np.testing.assert_allclose(dbeta, ref_dbeta, rtol=1e-4, atol=1e-5 * _scale_of(ref_dbeta))


@settings(max_examples=20)
@given(inputs_and_axes(), st.sampled_from(ACTIVATIONS), st.booleans(), st.integers(0, 2**31 - 1))
def test_fused_activation_matches_float64_reference(case, activation, masked, mask_seed):
    """a = f(BN(x)) and its gradients: dy·f′(z) through BN's backward, masked or not."""
    x, axes, gamma, beta, dy = case
    weights = None
    if masked:
        rng = np.random.default_rng(mask_seed)
        weights = (rng.uniform(size=x.shape[:1] + (1,) * (x.ndim - 1)) < 0.6).astype(np.float32)
        weights[:2] = 1.0
    _assert_activated_matches_reference(x, axes, gamma, beta, dy, activation, weights)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_activation_in_blockwise_sums_matches_reference(activation):
    """A tensor large enough for the blockwise loop (`_per_channel_sums`) of the backward."""
    rng = np.random.default_rng(5)
    x = (1.0 + 2.0 * rng.standard_normal((8, 16, 16, 64))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, 64).astype(np.float32)
    beta = rng.standard_normal(64).astype(np.float32)
    _assert_activated_matches_reference(x, (3,), gamma, beta, dy, activation)


def test_fused_activation_rejects_unknown_name():
    x = tf.ones((4, 3))
    with pytest.raises(ValueError, match="activation='gelu'"):
        kernel.fused_batch_norm(
            x, tf.ones((1, 3)), tf.zeros((1, 3)), reduction_axes=(0,), epsilon=1e-3,
            activation="gelu",
        )


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


def _training_moments(x, axes, monkeypatch, sums):
    """The batch mean and biased variance as training computes them (`fused_batch_norm`, the
    kernel the layer calls), with its sums taken whole ("plain") or in blocks of a few rows
    ("blockwise", the CPU path for large tensors; forced here on a small one)."""
    if sums == "blockwise":
        monkeypatch.setattr(kernel, "_BLOCKWISE_MIN_BYTES", 0)
        monkeypatch.setattr(kernel, "_BLOCK_BYTES", 4 * 64)
    monkeypatch.setattr(kernel, "sums_strategy", lambda device: sums)
    channels = tuple(x.shape[a] for a in axes)
    ones, zeros = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    _, mean, variance, *_ = _run_fused(x, axes, ones, zeros, np.zeros_like(x), 1e-3)
    return mean, variance


# A shape per case: the compiled kernel is traced once per shape, and the sums strategy is
# chosen at trace time.
STABILITY_CASES = [
    (1e4, "plain", (64, 7, 7, 3)),
    (-1e4, "plain", (63, 7, 7, 3)),
    (3e5, "plain", (62, 7, 7, 3)),
    (1e4, "blockwise", (61, 7, 7, 3)),
    (3e5, "blockwise", (60, 7, 7, 3)),
]


@pytest.mark.parametrize(
    "location,sums,shape", STABILITY_CASES, ids=[f"{c[0]:g}-{c[1]}" for c in STABILITY_CASES]
)
def test_training_moments_are_stable_for_large_means(monkeypatch, location, sums, shape):
    """Mean 1e4, std 0.1 in float32: E[x²]−E[x]² would give noise; the shifted pass training
    uses gives the variance to 1e-3 relative (of the float32 data's own float64 variance)."""
    rng = np.random.default_rng(2)
    x = (location + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    mean, variance = _training_moments(x, (3,), monkeypatch, sums)
    ref_mean, ref_var, _ = reference.moments(x, (3,))
    np.testing.assert_allclose(variance, ref_var, rtol=1e-3)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-7)

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


@pytest.mark.parametrize("sums,shape", [("plain", (16, 3)), ("blockwise", (17, 3))])
def test_constant_channel_has_zero_variance_not_negative(monkeypatch, sums, shape):
    x = np.full(shape, 7.25, np.float32)
    _, variance = _training_moments(x, (1,), monkeypatch, sums)
    assert np.all(variance == 0.0)


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


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(1, 4), st.booleans(), st.integers(0, 2**31 - 1))
def test_blockwise_sums_of_any_row_count_match_float64(batch, channels, batch_known, seed):
    """The loop's blocks of groups of rows: any number of rows (fewer than a group, than a
    block, whole blocks and a tail), with the batch size known at trace time or only at run
    time (where the block and group counts are tensors), gives the float64 sums."""
    rng = np.random.default_rng(seed)
    x = (10.0 + rng.standard_normal((batch, 3, channels))).astype(np.float32)
    axes = (0, 1)
    signature = [tf.TensorSpec([batch if batch_known else None, 3, channels], tf.float32)]

    @tf.function(jit_compile=True, input_signature=signature)
    def sums(x):
        return kernel.shifted_sums(x, kernel.reference_value(x, axes), axes, blockwise=True)

    with pytest.MonkeyPatch.context() as patch:
        # Blocks of 64 floats, cut to whole groups of 8 rows: 16 rows of 4 or of 3 channels
        # (two groups), 32 of 2 (four), 64 of 1 (eight).
        patch.setattr(kernel, "_BLOCKWISE_MIN_BYTES", 0)
        patch.setattr(kernel, "_BLOCK_BYTES", 4 * 64)
        sum_shifted, sum_sq_shifted = sums(tf.constant(x))
    d = x.astype(np.float64) - x[:1, :1].astype(np.float64)
    # Σd crosses zero: its error is relative to the size of the terms, √Σd² at most.
    np.testing.assert_allclose(sum_shifted.numpy().reshape(-1), np.sum(d, axes), rtol=1e-5,
                               atol=1e-5 * np.sqrt(np.max(np.sum(d * d, axes)) + 1.0))
    np.testing.assert_allclose(sum_sq_shifted.numpy().reshape(-1), np.sum(d * d, axes),
                               rtol=1e-5)


@pytest.mark.parametrize("device,strategy", [
    ("CPU", "blockwise"),
    ("/device:CPU:0", "blockwise"),
    ("/job:localhost/replica:0/task:0/device:CPU:0", "blockwise"),
    ("cpu:0", "blockwise"),
    ("GPU", "plain"),
    ("/GPU:0", "plain"),
    ("/job:worker/replica:0/task:1/device:GPU:1", "plain"),
    ("/device:TPU:0", "plain"),
])
def test_blockwise_sums_only_on_a_cpu(device, strategy):
    assert kernel.sums_strategy(device) == strategy


def test_unplaced_kernel_follows_tensorflows_default_placement():
    expected = "plain" if tf.config.list_logical_devices("GPU") else "blockwise"
    assert kernel.sums_strategy("") == expected
    assert kernel.sums_strategy("/job:localhost/replica:0/task:0") == expected


@pytest.mark.parametrize("strategy,loops", [("blockwise", 2), ("plain", 0)])
def test_the_kernel_sums_as_its_placement_says(monkeypatch, strategy, loops):
    """The device of x decides: a large tensor takes one XLA loop in the forward and one in the
    backward on a CPU, none elsewhere (the strategy is forced here: this machine has no GPU);
    both give the reference's numbers."""
    devices, traced_loops = [], []
    monkeypatch.setattr(kernel, "sums_strategy", lambda d: devices.append(d) or strategy)
    real_while_loop = tf.while_loop
    monkeypatch.setattr(
        tf, "while_loop", lambda *a, **k: traced_loops.append(1) or real_while_loop(*a, **k)
    )
    rng = np.random.default_rng(3)
    # A shape of its own (over the blockwise threshold), so both passes are traced here.
    shape = (9 + loops, 16, 16, 64)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, 64).astype(np.float32)
    beta = rng.standard_normal(64).astype(np.float32)
    with tf.device("/CPU:0"):
        y, _, _, _, dx, _, _ = _run_fused(x, (3,), gamma, beta, dy, 1e-3)
    assert kernel._device_type(devices[0]) == "CPU"
    assert len(traced_loops) == loops
    ref_y, *_ = reference.forward(x, gamma, beta, (3,), 1e-3)
    ref_dx, _, _ = reference.backward(x, gamma, dy, (3,), 1e-3)
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4 * _scale_of(ref_y))
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-3, atol=1e-5 * _dx_term_scale(
        x, gamma, dy, (3,), 1e-3))


# --- Batch Renormalization and ghost batches ---------------------------------------------------


# Fewer examples: each new shape compiles the XLA kernels afresh.
@settings(max_examples=12)
@given(
    inputs_and_axes(max_rank=4),
    st.integers(0, 2**31 - 1),
    st.sampled_from([(0.0, np.inf, np.inf), (0.5, 2.0, 0.5), (1.0, 1.0, 0.0), (0.9, 1.1, 5.0)]),
)
def test_renorm_forward_and_backward_match_reference(case, seed, clipping):
    """y = γ·(r·x̂ + d) + β with r, d clipped and constant in the backward pass."""
    x, axes, gamma, beta, dy = case
    rng = np.random.default_rng(seed)
    rmin, rmax, dmax = clipping
    channel_shape = gamma.shape
    # Renorm statistics near and far from the batch's, so some channels clip.
    renorm_mean = (x.mean() + np.std(x) * rng.standard_normal(channel_shape)).astype(np.float32)
    renorm_stddev = (np.std(x) * rng.uniform(0.3, 3.0, channel_shape)).astype(np.float32)
    epsilon = 1e-3
    red = reference.reduction_axes(x.ndim, axes)
    x_t, g_t, b_t = tf.constant(x), _keepdims(gamma, x.ndim, axes), _keepdims(beta, x.ndim, axes)
    renorm = kernel.Renorm(
        _keepdims(renorm_mean, x.ndim, axes), _keepdims(renorm_stddev, x.ndim, axes),
        rmin, rmax, dmax,
    )
    with tf.GradientTape() as tape:
        tape.watch([x_t, g_t, b_t])
        y, *_ = kernel.fused_batch_norm(
            x_t, g_t, b_t, reduction_axes=red, epsilon=epsilon, renorm=renorm
        )
        loss = tf.reduce_sum(y * dy)
    dx, dgamma, dbeta = (t.numpy() for t in tape.gradient(loss, [x_t, g_t, b_t]))
    ref_y, ref_dx, ref_dgamma, ref_dbeta, r, _ = reference.renorm(
        x, gamma, beta, dy, axes, epsilon, renorm_mean, renorm_stddev, rmin, rmax, dmax
    )
    np.testing.assert_allclose(y.numpy(), ref_y, rtol=1e-4, atol=1e-4 * _scale_of(ref_y))
    dx_scale = _dx_term_scale(x, gamma * np.reshape(r, channel_shape), dy, axes, epsilon)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-3, atol=1e-5 * dx_scale)
    np.testing.assert_allclose(dgamma.reshape(channel_shape), ref_dgamma, rtol=1e-4,
                               atol=1e-4 * _scale_of(ref_dgamma))
    np.testing.assert_allclose(dbeta.reshape(channel_shape), ref_dbeta, rtol=1e-4,
                               atol=1e-5 * _scale_of(ref_dbeta))


@settings(max_examples=12)
@given(inputs_and_axes(max_rank=4), st.sampled_from([1, 2, 3]), st.integers(2, 4))
def test_ghost_batches_match_reference(case, virtual_batch_size, groups):
    """Each group of k samples normalized on its own, forward and backward; the pooled batch
    statistics as documented."""
    x, axes, gamma, beta, dy = case
    k = virtual_batch_size
    if np.prod([x.shape[a] for a in range(1, x.ndim) if a not in axes]) * k < 2:
        k = 2  # a group needs m >= 2 values per channel for a variance
    repeats = -(-groups * k // len(x))
    x, dy = (np.concatenate([t] * repeats)[: groups * k] for t in (x, dy))
    x = x + np.arange(len(x)).reshape((-1,) + (1,) * (x.ndim - 1)).astype(np.float32)
    red = reference.reduction_axes(x.ndim, axes)
    x_t, g_t, b_t = tf.constant(x), _keepdims(gamma, x.ndim, axes), _keepdims(beta, x.ndim, axes)
    with tf.GradientTape() as tape:
        tape.watch([x_t, g_t, b_t])
        y, mean, variance, count, dof = kernel.ghost_batch_norm(
            x_t, g_t, b_t, virtual_batch_size=k, reduction_axes=red, epsilon=1e-3
        )
        loss = tf.reduce_sum(y * dy)
    dx, dgamma, dbeta = (t.numpy() for t in tape.gradient(loss, [x_t, g_t, b_t]))
    ref_y, ref_dx, ref_dgamma, ref_dbeta, ref_mean, ref_var, ref_m, ref_dof = (
        reference.ghost_batches(x, gamma, beta, dy, axes, 1e-3, k)
    )
    np.testing.assert_allclose(y.numpy(), ref_y, rtol=1e-4, atol=1e-4 * _scale_of(ref_y))
    dx_scale = max(
        _dx_term_scale(x[i : i + k], gamma, dy[i : i + k], axes, 1e-3)
        for i in range(0, len(x), k)
    )
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-3, atol=1e-5 * dx_scale)
    channel_shape = gamma.shape
    np.testing.assert_allclose(dgamma.reshape(channel_shape), ref_dgamma, rtol=1e-4,
                               atol=1e-4 * _scale_of(ref_dgamma))
    np.testing.assert_allclose(dbeta.reshape(channel_shape), ref_dbeta, rtol=1e-4,
                               atol=1e-5 * _scale_of(ref_dbeta))
    np.testing.assert_allclose(mean.numpy().reshape(-1), ref_mean, rtol=1e-5,
                               atol=1e-5 * _scale_of(x))
    np.testing.assert_allclose(variance.numpy().reshape(-1), ref_var, rtol=1e-4,
                               atol=1e-6 * _scale_of(x) ** 2)
    np.testing.assert_array_equal(count.numpy().reshape(-1), ref_m)
    np.testing.assert_array_equal(dof.numpy().reshape(-1), ref_dof)


def test_fully_masked_batch_is_finite_as_in_keras():
    """m = 0: mean 0, variance 0, y = x/√ε·γ + β, dx = γ/√ε·g, as Keras's masked moments give."""
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    dy = np.ones_like(x)
    y, mean, variance, count, dx, dgamma, dbeta = _run_fused(
        x, (1,), np.full(3, 2.0, np.float32), np.ones(3, np.float32), dy, 1e-2,
        weights=tf.zeros((4, 1)),
    )
    np.testing.assert_array_equal(count, 0.0)
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_array_equal(variance, 0.0)
    np.testing.assert_allclose(y, x / 0.1 * 2.0 + 1.0, rtol=1e-6)
    np.testing.assert_allclose(dx, np.full_like(x, 20.0), rtol=1e-6)


def test_masked_ghost_batches_are_masked_batches_side_by_side():
    """With a mask, each group is the masked BN of its own rows (forward and backward), one
    group entirely masked included; the pooled statistics count only unmasked values."""
    rng = np.random.default_rng(6)
    x = (3.0 + 2.0 * rng.standard_normal((6, 5, 2))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    mask = (rng.uniform(size=(6, 5, 1)) < 0.6).astype(np.float32)
    mask[0, :2] = mask[4, :2] = 1.0
    mask[2:4] = 0.0  # the second group of two rows: nothing counted
    gamma = _keepdims(np.array([1.5, 0.5]), 3, (2,))
    beta = _keepdims(np.array([0.2, -1.0]), 3, (2,))

    def run(batch_norm, rows):
        x_t = tf.constant(x[rows])
        with tf.GradientTape() as tape:
            tape.watch([x_t, gamma, beta])
            y, *statistics = batch_norm(x_t, tf.constant(mask[rows]))
            loss = tf.reduce_sum(y * dy[rows])
        return y.numpy(), [g.numpy() for g in tape.gradient(loss, [x_t, gamma, beta])], statistics

    y, grads, (mean, variance, count, dof) = run(
        lambda x_t, w: kernel.ghost_batch_norm(x_t, gamma, beta, virtual_batch_size=2,
                                               reduction_axes=(0, 1), epsilon=1e-3, weights=w),
        slice(None),
    )
    groups = [run(lambda x_t, w: kernel.fused_batch_norm(x_t, gamma, beta, reduction_axes=(0, 1),
                                                         epsilon=1e-3, weights=w),
                  slice(i, i + 2)) for i in (0, 2, 4)]
    np.testing.assert_allclose(y, np.concatenate([g[0] for g in groups]), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(grads[0], np.concatenate([g[1][0] for g in groups]), rtol=1e-5,
                               atol=1e-5)
    for i in (1, 2):  # γ and β are shared: their gradients add up over the groups
        np.testing.assert_allclose(grads[i], sum(g[1][i] for g in groups), rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(y)) and all(np.all(np.isfinite(g)) for g in grads)
    counts = np.array([mask[i:i + 2].sum() for i in (0, 2, 4)])
    np.testing.assert_array_equal(count.numpy().reshape(-1), [counts.sum()] * 2)
    np.testing.assert_array_equal(dof.numpy().reshape(-1), [(counts[counts > 0] - 1).sum()] * 2)
    ref_mean, ref_var, _ = reference.moments(x, (2,), mask)
    np.testing.assert_allclose(mean.numpy().reshape(-1), ref_mean.reshape(-1), rtol=1e-5)
    within = sum(c * g[2][1].numpy().reshape(-1) for c, g in zip(counts, groups, strict=True))
    np.testing.assert_allclose(variance.numpy().reshape(-1), within / counts.sum(), rtol=1e-5)
    assert np.all(variance.numpy() < ref_var)  # within-group, not the whole batch's


@pytest.mark.parametrize("shape, activation", [
    ((8, 6), None),                 # small: plain TensorFlow operations in the caller's graph
    ((16, 32, 32, 8), "relu"),      # 512 KiB: its own XLA cluster, blockwise sums
], ids=["plain", "compiled"])
def test_forward_without_backward_matches_float64_reference(shape, activation):
    """`batch_norm_forward` (the population pass's moments): y and the moments, both paths,
    mean far from zero so that the shifted sums matter."""
    rng = np.random.default_rng(3)
    x = (40.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
    channels = shape[-1]
    gamma = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    beta = rng.standard_normal(channels).astype(np.float32)
    axes = (len(shape) - 1,)
    red = reference.reduction_axes(len(shape), axes)
    y, mean, variance, count = tf.function(lambda x: kernel.batch_norm_forward(
        x, _keepdims(gamma, len(shape), axes), _keepdims(beta, len(shape), axes),
        reduction_axes=red, epsilon=1e-3, activation=activation,
    ))(tf.constant(x))
    ref_y, ref_mean, ref_variance, ref_count = reference.forward(x, gamma, beta, axes, 1e-3)
    if activation == "relu":
        ref_y = np.maximum(ref_y, 0.0)
    np.testing.assert_allclose(y.numpy(), ref_y, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-6)
    np.testing.assert_allclose(variance.numpy(), ref_variance, rtol=2e-4)
    np.testing.assert_array_equal(count.numpy(), ref_count)
