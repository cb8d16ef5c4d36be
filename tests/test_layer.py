"""`kerasbn.BatchNormalization`: statistics, Keras parity, modes, errors, dtypes, serialization."""


import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

import kerasbn
from tests import reference
from tests.helpers import keras_batch_normalization


def _batches(rng, count, shape, location=2.0, scale=3.0, sizes=None):
    sizes = sizes or [shape[0]] * count
    return [
        (location + scale * rng.standard_normal((n,) + tuple(shape[1:]))).astype(np.float32)
        for n in sizes
    ]


def _train_on(layer, batches):
    for x in batches:
        layer(x, training=True)


# --- inference statistics, against the float64 reference --------------------------------


@pytest.mark.parametrize("unbiased_variance", [True, False])
@pytest.mark.parametrize("shape,axis", [((6, 4), -1), ((4, 3, 5, 2), -1), ((4, 2, 3, 5), 1)])
def test_moving_average_statistics_match_reference(rng, shape, axis, unbiased_variance):
    momentum = 0.8
    layer = kerasbn.BatchNormalization(
        axis=axis, momentum=momentum, unbiased_variance=unbiased_variance
    )
    batches = _batches(rng, 4, shape)
    _train_on(layer, batches)

    axes = (axis % len(shape),)
    ref_mean, ref_var = np.zeros(shape[axes[0]]), np.ones(shape[axes[0]])
    for x in batches:
        mean, var, m = reference.moments(x, axes)
        if unbiased_variance:
            var = reference.unbiased(var, m)
        ref_mean = momentum * ref_mean + (1 - momentum) * mean.reshape(-1)
        ref_var = momentum * ref_var + (1 - momentum) * var.reshape(-1)
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), ref_var, rtol=1e-5)
    assert int(layer.skipped_updates.numpy()) == 0


@pytest.mark.parametrize("shape,axis", [((8, 5), -1), ((4, 3, 3, 2), -1), ((3, 2, 4, 4, 3), 1)])
def test_population_mode_is_the_papers_algorithm_2(rng, shape, axis):
    """Equal batch sizes: mean = E_B[μ_B], variance = m/(m−1)·E_B[σ²_B], m = N·H·W."""
    layer = kerasbn.BatchNormalization(axis=axis, statistics="population")
    batches = _batches(rng, 5, shape)
    _train_on(layer, batches)
    axes = (axis % len(shape),)
    stats = [reference.moments(x, axes) for x in batches]
    m = stats[0][2].reshape(-1)[0]
    assert m == np.prod(shape) / shape[axes[0]]
    ref_mean = np.mean([s[0].reshape(-1) for s in stats], axis=0)
    ref_var = m / (m - 1) * np.mean([s[1].reshape(-1) for s in stats], axis=0)
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), ref_var, rtol=1e-5)


def test_population_mode_weights_unequal_batches_by_their_values(rng):
    """Documented rule: mean = Σ m_B μ_B / Σ m_B, variance = Σ m_B σ²_B / Σ (m_B − 1)."""
    layer = kerasbn.BatchNormalization(statistics="population")
    batches = _batches(rng, 3, (0, 3), sizes=[16, 16, 3])
    _train_on(layer, batches)
    stats = [reference.moments(x, (1,)) for x in batches]
    sizes = np.array([len(x) for x in batches], np.float64)[:, None]
    means = np.array([s[0].reshape(-1) for s in stats])
    variances = np.array([s[1].reshape(-1) for s in stats])
    ref_mean = (sizes * means).sum(0) / sizes.sum()
    ref_var = (sizes * variances).sum(0) / (sizes - 1).sum()
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), ref_var, rtol=1e-5)
    np.testing.assert_allclose(layer.population_count.numpy(), [35.0] * 3)
    np.testing.assert_allclose(layer.population_dof.numpy(), [32.0] * 3)


def test_reset_statistics_starts_a_new_population_estimate(rng):
    layer = kerasbn.BatchNormalization(statistics="population")
    _train_on(layer, _batches(rng, 3, (8, 4), location=50.0))
    layer.reset_statistics()
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(4))
    np.testing.assert_array_equal(layer.moving_variance.numpy(), np.ones(4))
    second = _batches(rng, 2, (8, 4), location=-3.0)
    _train_on(layer, second)
    stats = [reference.moments(x, (1,)) for x in second]
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), np.mean([s[0].reshape(-1) for s in stats], 0), rtol=1e-5
    )


def test_inference_uses_stored_statistics(rng):
    layer = kerasbn.BatchNormalization(axis=1, epsilon=1e-2)
    layer.build((None, 3, 4))
    gamma, beta = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    for variable, value in zip(layer.weights[:4], (gamma, beta, mean, var), strict=True):
        variable.assign(value)
    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(
        layer(x, training=False).numpy(),
        reference.inference(x, gamma, beta, mean, var, (1,), 1e-2),
        rtol=1e-5, atol=1e-5,
    )


@given(
    st.sampled_from([((4, 6), (1,)), ((3, 4, 5), (1, 2)), ((2, 3, 4, 5), (1, 3)),
                     ((2, 3, 2, 2, 4), (4,)), ((3, 4, 2, 2), (-3, -1))]),
    st.integers(0, 2**31 - 1),
)
def test_tuple_axes_forward_matches_reference(case, seed):
    shape, axis = case
    rng = np.random.default_rng(seed)
    axes = tuple(sorted(a % len(shape) for a in axis))
    x = (1.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
    layer = kerasbn.BatchNormalization(axis=axis, momentum=0.0)
    y = layer(x, training=True).numpy()
    channel_shape = tuple(shape[a] for a in axes)
    assert tuple(layer.gamma.shape) == channel_shape
    ref_y, ref_mean, ref_var, m = reference.forward(
        x, np.ones(channel_shape), np.zeros(channel_shape), axes, 1e-3
    )
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref_mean.reshape(channel_shape),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               reference.unbiased(ref_var, m).reshape(channel_shape), rtol=1e-5)


# --- parity with keras.layers.BatchNormalization -----------------------------------------


def _pair(**kwargs):
    ours = kerasbn.BatchNormalization(unbiased_variance=False, **kwargs)
    theirs = keras.layers.BatchNormalization(**kwargs)
    return ours, theirs


@pytest.mark.parametrize("shape,axis", [((16, 7), -1), ((4, 5, 5, 3), -1), ((4, 3, 6), 1),
                                        ((2, 3, 4, 4, 2), -1)])
def test_matches_keras_batch_normalization(rng, shape, axis):
    """Outputs, gradients and moving statistics to 1e-6, training and inference."""
    ours, theirs = _pair(axis=axis, momentum=0.7, epsilon=1e-3)
    upstream = tf.constant(rng.standard_normal(shape), tf.float32)
    for step in range(3):
        x = tf.constant(_batches(rng, 1, shape, location=step)[0])
        results = []
        for layer in (ours, theirs):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * upstream)
            grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
            results.append((y.numpy(), *(g.numpy() for g in grads)))
        for ours_value, keras_value in zip(*results, strict=True):
            np.testing.assert_allclose(ours_value, keras_value, rtol=1e-6, atol=1e-6 * max(
                1.0, np.max(np.abs(keras_value))))
        for name in ("moving_mean", "moving_variance"):
            np.testing.assert_allclose(
                getattr(ours, name).numpy(), getattr(theirs, name).numpy(), rtol=1e-6, atol=1e-6
            )
    np.testing.assert_allclose(ours(x).numpy(), theirs(x).numpy(), rtol=1e-6, atol=1e-6)


def test_masked_statistics_match_keras(rng):
    ours, theirs = _pair(momentum=0.5)
    x = rng.standard_normal((4, 6, 3)).astype(np.float32) * 2 + 1
    mask = rng.uniform(size=(4, 6)) < 0.5
    mask[0, :2] = True
    y_ours = ours(x, training=True, mask=tf.constant(mask))
    y_keras = theirs(x, training=True, mask=tf.constant(mask))
    np.testing.assert_allclose(y_ours.numpy(), y_keras.numpy(), rtol=1e-5, atol=1e-5)
    mean, var, _ = reference.moments(x, (2,), mask[..., None])
    np.testing.assert_allclose(ours.moving_mean.numpy(), 0.5 * mean.reshape(-1), rtol=1e-5)
    np.testing.assert_allclose(
        ours.moving_variance.numpy(), 0.5 + 0.5 * var.reshape(-1), rtol=1e-5
    )


def test_keras_weights_load_into_our_layer(tmp_path, rng):
    """Same names and order: a Keras BN model's weights file loads into the kerasbn model."""
    def model_with(bn):
        return keras.Sequential([keras.Input((5,)), keras.layers.Dense(4), bn])

    theirs = model_with(keras.layers.BatchNormalization())
    for variable in theirs.layers[-1].weights:
        variable.assign(rng.uniform(0.5, 2.0, variable.shape))
    path = str(tmp_path / "keras_bn.weights.h5")
    theirs.save_weights(path)
    ours = model_with(kerasbn.BatchNormalization())
    ours.load_weights(path)
    assert [v.name for v in ours.layers[-1].weights[:4]] == [
        "gamma", "beta", "moving_mean", "moving_variance"
    ]
    x = rng.standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_allclose(ours(x).numpy(), theirs(x).numpy(), rtol=1e-6)

    # And the in-memory route, both ways.
    layer = kerasbn.BatchNormalization()
    layer.build((None, 4))
    layer.set_weights(theirs.layers[-1].get_weights())
    keras_layer = keras.layers.BatchNormalization()
    keras_layer.build((None, 4))
    keras_layer.set_weights(layer.get_weights()[:4])
    np.testing.assert_allclose(keras_layer.moving_mean.numpy(), layer.moving_mean.numpy())


def test_keras_config_constructs_our_layer():
    config = keras.layers.BatchNormalization(axis=1, momentum=0.9).get_config()
    layer = kerasbn.BatchNormalization.from_config(config)
    assert (layer.axis, layer.momentum) == (1, 0.9)
    clipping = {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0}
    config = keras_batch_normalization(
        renorm=True, renorm_clipping=clipping, renorm_momentum=0.9
    ).get_config()
    layer = kerasbn.BatchNormalization.from_config(config)
    assert (layer.renorm, layer.renorm_clipping, layer.renorm_momentum) == (True, clipping, 0.9)


# --- Keras conventions ---------------------------------------------------------------------


def test_trainable_false_means_inference_mode(rng):
    layer = kerasbn.BatchNormalization()
    x = _batches(rng, 1, (8, 3))[0]
    layer(x, training=True)
    frozen = [w.numpy().copy() for w in layer.weights]
    layer.trainable = False
    y = layer(x, training=True)
    for before, after in zip(frozen, layer.weights, strict=True):
        np.testing.assert_array_equal(before, after.numpy())
    np.testing.assert_allclose(y.numpy(), layer(x, training=False).numpy())


# float32's machine epsilon: a weight's rounding unit is about this times its size.
FLOAT32_EPS = float(np.finfo(np.float32).eps)


@pytest.mark.parametrize("bn_kwargs", [
    {},
    {"virtual_batch_size": 4, "renorm": True, "renorm_clipping": {"rmax": 3.0, "dmax": 5.0},
     "renorm_momentum": 0.5, "renorm_warmup_steps": 5},
], ids=["plain", "ghost_batches_renorm_warmup"])
def test_jit_compile_trains_to_the_same_weights_as_without(rng, bn_kwargs):
    """The same model, initial weights, batches and 12 SGD steps, compiled with XLA and without:
    every weight and stored statistic agrees to float32 rounding. Both programs compute the
    same formulas; XLA fuses and reorders float32 sums, so each step's values differ by a few
    units in the last place of the values involved, and 12 plain SGD steps at rate 0.1 do not
    amplify that. So the bound is 16·ε times the largest |value| a variable held in training
    (ε = float32's 2⁻²³; a bias that ends near 0 after larger steps back and forth carries the
    rounding of those steps); measured here: at most 3.5·ε. Room for other CPUs' vector widths
    and XLA versions, not for a real
    difference: a mistake in either path (a statistics update missed or applied twice, another
    normalization) moves the values by orders of magnitude more."""
    x = rng.standard_normal((64, 6, 6, 2)).astype(np.float32) * 3 + 5
    y = (x.mean(axis=(1, 2, 3)) > 5).astype(np.float32)

    def model():
        return keras.Sequential([
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, use_bias=False),
            kerasbn.BatchNormalization(**bn_kwargs),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(1, activation="sigmoid"),
        ])

    class LargestValues(keras.callbacks.Callback):
        """The largest |value| each variable holds after any step."""

        def on_train_batch_end(self, batch, logs=None):
            for k, variable in enumerate(self.model.weights):
                largest[k] = max(largest[k], float(np.max(np.abs(variable.numpy()))))

    initial = model().get_weights()
    largest = [float(np.max(np.abs(w))) for w in initial]
    trained = {}
    for jit_compile in (False, True):
        trained[jit_compile] = model()
        trained[jit_compile].set_weights(initial)
        trained[jit_compile].compile(
            keras.optimizers.SGD(0.1), "binary_crossentropy", jit_compile=jit_compile
        )
        history = trained[jit_compile].fit(
            x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=[LargestValues()]
        )
        assert history.history["loss"][-1] < history.history["loss"][0]
    bn = trained[True].layers[1]
    assert int(bn.skipped_updates.numpy()) == 0 and np.all(bn.moving_mean.numpy() != 0.0)
    if bn.renorm_step is not None:
        assert int(bn.renorm_step.numpy()) == 12  # 4 steps per epoch
    weights = trained[False].weights, trained[True].weights, initial
    for plain, compiled, start, scale in zip(*weights, largest, strict=True):
        expected, actual = plain.numpy(), compiled.numpy()
        if np.issubdtype(expected.dtype, np.integer):  # counters: exact
            np.testing.assert_array_equal(actual, expected, err_msg=plain.name)
            continue
        assert not np.array_equal(expected, start), f"{plain.name} did not change in training"
        bound = 16 * FLOAT32_EPS * scale
        np.testing.assert_allclose(actual, expected, rtol=0, atol=bound, err_msg=plain.name)


@pytest.mark.parametrize("policy,dtype", [("mixed_float16", "float16"),
                                          ("mixed_bfloat16", "bfloat16")])
def test_mixed_precision_keeps_statistics_in_float32(rng, policy, dtype):
    keras.mixed_precision.set_global_policy(policy)
    layer = kerasbn.BatchNormalization(momentum=0.0)
    x = tf.constant(300.0 + 20.0 * rng.standard_normal((64, 4, 4, 3)), dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, "float32") ** 2)
    dx = tape.gradient(loss, x)
    assert y.dtype == dtype and dx.dtype == dtype
    assert layer.moving_mean.dtype == "float32"
    # float16 would overflow Σx² (300² · 16 ≫ 65504): statistics must be finite and right.
    ref_mean, ref_var, m = reference.moments(tf.cast(x, "float32").numpy(), (3,))
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref_mean.reshape(-1), rtol=1e-5)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), reference.unbiased(ref_var, m).reshape(-1), rtol=1e-4
    )
    assert np.all(np.isfinite(tf.cast(y, "float32").numpy()))
    assert np.all(np.isfinite(tf.cast(dx, "float32").numpy()))
    assert np.all(np.isfinite(tf.cast(layer(x), "float32").numpy()))


def test_large_mean_small_std_statistics(rng):
    layer = kerasbn.BatchNormalization(momentum=0.0)
    x = (1e4 + 0.1 * rng.standard_normal((32, 5, 5, 4))).astype(np.float32)
    layer(x, training=True)
    _, var, m = reference.moments(x, (3,))
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), reference.unbiased(var, m).reshape(-1), rtol=1e-3
    )


# --- what cannot be learned from a batch ------------------------------------------------


def test_non_finite_batch_leaves_statistics_and_counts(rng):
    for statistics in ("moving_average", "population"):
        layer = kerasbn.BatchNormalization(statistics=statistics)
        _train_on(layer, _batches(rng, 2, (8, 3)))
        before = [w.numpy().copy() for w in (layer.moving_mean, layer.moving_variance)]
        x = _batches(rng, 1, (8, 3))[0]
        x[3, 1] = np.nan
        layer(x, training=True)
        x[3, 1] = np.inf
        layer(x, training=True)
        assert int(layer.skipped_updates.numpy()) == 2
        for value, variable in zip(before, (layer.moving_mean, layer.moving_variance),
                                   strict=True):
            np.testing.assert_array_equal(value, variable.numpy())


def test_static_single_value_batch_is_refused():
    layer = kerasbn.BatchNormalization()
    with pytest.raises(ValueError, match=r"m = 1.*Received: inputs.shape=\(1, 4\)"):
        layer(np.ones((1, 4), np.float32), training=True)


def test_runtime_single_value_batch_writes_no_nan():
    """m = 1 known only at run time: the unbiased update is skipped and counted, never NaN."""
    layer = kerasbn.BatchNormalization()
    layer.build((None, 4))
    step = tf.function(lambda x: layer(x, training=True),
                       input_signature=[tf.TensorSpec((None, 4), tf.float32)])
    step(tf.ones((1, 4)))
    assert int(layer.skipped_updates.numpy()) == 1
    np.testing.assert_array_equal(layer.moving_variance.numpy(), np.ones(4))
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(4))


# --- bad arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    ({"statistics": "ema"}, r"Received: statistics='ema'"),
    ({"epsilon": -1e-3}, r"Received: epsilon=-0.001"),
    ({"momentum": 1.5}, r"Received: momentum=1.5"),
    ({"momentum": -0.1}, r"Received: momentum=-0.1"),
    ({"axis": ()}, r"Received: axis=\(\)"),
    ({"renorm_momentum": 2}, r"Received: renorm_momentum=2"),
    ({"virtual_batch_size": 0}, r"Received: virtual_batch_size=0"),
    ({"virtual_batch_size": 2.5}, r"Received: virtual_batch_size=2.5"),
    ({"renorm_warmup_steps": -1, "renorm": True}, r"Received: renorm_warmup_steps=-1"),
    ({"renorm_warmup_steps": 10}, r"needs renorm=True.*Received: renorm_warmup_steps=10"),
    ({"renorm_warmup_steps": 10, "renorm": True, "renorm_clipping": {"rmax": 3.0}},
     r"finite 'rmax' and 'dmax'.*Received: renorm_clipping=\{'rmax': 3.0\}"),
    ({"renorm_warmup_steps": 10, "renorm": True,
      "renorm_clipping": {"rmax": 0.5, "rmin": 0.1, "dmax": 1.0}},
     r"rmin <= 1 <= rmax.*'rmax': 0.5"),
    # Keras's messages, with the values filled in.
    ({"renorm": True, "renorm_clipping": {"random_key": 1.0}},
     r"Received invalid keys for `renorm_clipping` argument: \{'random_key': 1.0\}"),
    ({"renorm": True, "renorm_clipping": {"rmax": 0.0, "rmin": 1.0}},
     r"rmax should be greater than rmin.*Received: rmax=0.0, rmin=1.0"),
    ({"renorm": True, "renorm_clipping": {"rmax": 1.0, "dmax": -1.0}},
     r"dmax should be non-negative.*Received: dmax=-1.0"),
    ({"renorm": True, "renorm_clipping": {"rmax": "3"}}, r"Received: renorm_clipping="),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kerasbn.BatchNormalization(**kwargs)


@pytest.mark.parametrize("name", ["center", "scale", "renorm", "synchronized",
                                  "unbiased_variance"])
@pytest.mark.parametrize("value", ["no", "false", 1, None])
def test_bool_arguments_must_be_bools(name, value):
    with pytest.raises(TypeError, match=rf"`{name}` must be a bool. Received: {name}={value!r}"):
        kerasbn.BatchNormalization(**{name: value})


def test_renorm_clipping_is_checked_only_with_renorm_as_in_keras():
    """Keras ignores (and keeps) renorm_clipping without renorm; so do we."""
    layer = kerasbn.BatchNormalization(renorm_clipping={"rmax": 0.0, "rmin": 1.0})
    assert layer.get_config()["renorm_clipping"] == {"rmax": 0.0, "rmin": 1.0}
    assert kerasbn.BatchNormalization(renorm=True).get_config()["renorm_clipping"] == {}


def test_axis_of_wrong_type():
    with pytest.raises(TypeError, match=r"Received: axis='channels'"):
        kerasbn.BatchNormalization(axis="channels")


@pytest.mark.parametrize("axis,shape,message", [
    (5, (None, 3, 4), r"out of range.*Received: axis=5"),
    (-4, (None, 3, 4), r"out of range.*Received: axis=-4"),
    ((1, -2), (None, 3, 4), r"same axis twice.*Received: axis=\(1, -2\)"),
    (-1, (None,), r"rank >= 2.*Received: input_shape=\(None,\)"),
    (1, (None, None, 4), r"unknown size.*Received: input_shape=\(None, None, 4\), axis=1"),
])
def test_bad_axis_for_input_is_refused_at_build(axis, shape, message):
    layer = kerasbn.BatchNormalization(axis=axis)
    with pytest.raises(ValueError, match=message):
        layer.build(shape)
    assert not layer.weights


# --- serialization --------------------------------------------------------------------------


def test_numpy_arguments_give_a_serializable_config():
    layer = kerasbn.BatchNormalization(
        renorm=np.bool_(True), renorm_clipping={"rmax": np.float32(2.0), "dmax": np.int64(1)},
        renorm_warmup_steps=np.int64(5), virtual_batch_size=np.int32(4),
    )
    config = layer.get_config()
    assert json.loads(json.dumps(config)) == config
    assert config["renorm_clipping"] == {"rmax": 2.0, "dmax": 1.0}


def test_config_round_trip():
    layer = kerasbn.BatchNormalization(
        axis=(1, 2), momentum=0.9, epsilon=1e-5, center=False, statistics="population",
        unbiased_variance=False, gamma_regularizer="l2", synchronized=True,
    )
    config = layer.get_config()
    clone = kerasbn.BatchNormalization.from_config(config)
    assert clone.get_config() == config
    assert clone.axis == (1, 2)


@pytest.mark.parametrize("bn_kwargs", [
    {"statistics": "population"},
    {"statistics": "population", "renorm": True, "virtual_batch_size": 5},
    {"renorm": True, "renorm_clipping": {"rmax": 2.0, "dmax": 1.0}, "renorm_warmup_steps": 10},
], ids=["population", "population_renorm_ghost", "renorm_warmup"])
def test_keras_file_round_trip_keeps_the_state(tmp_path, rng, bn_kwargs):
    model = keras.Sequential([
        keras.Input((4, 4, 2)),
        keras.layers.Conv2D(3, 3, padding="same"),
        kerasbn.BatchNormalization(**bn_kwargs),
    ])
    bn = model.layers[-1]
    _train_on(bn, [model.layers[0](b) for b in _batches(rng, 3, (5, 4, 4, 2))])
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    loaded_bn = loaded.layers[-1]
    assert isinstance(loaded_bn, kerasbn.BatchNormalization)
    assert loaded_bn.get_config() == bn.get_config()
    for ours, theirs in zip(bn.weights, loaded_bn.weights, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy(), ours.name)
    # Training continues where it stopped (population estimate, renorm statistics, warm-up).
    more = model.layers[0](_batches(rng, 1, (5, 4, 4, 2))[0])
    np.testing.assert_array_equal(bn(more, training=True).numpy(),
                                  loaded_bn(more, training=True).numpy())
    for ours, theirs in zip(bn.weights, loaded_bn.weights, strict=True):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-6, err_msg=ours.name)


def test_population_mode_with_renorm_keeps_moving_stddev_consistent(rng):
    """Population mode + renorm: Algorithm 2 for the inference statistics, moving_stddev =
    √(variance + ε) with them, and the renorm statistics as moving averages."""
    layer = kerasbn.BatchNormalization(statistics="population", renorm=True,
                                       renorm_momentum=0.5)
    batches = _batches(rng, 3, (8, 3))
    _train_on(layer, batches)
    stats = [reference.moments(x, (1,)) for x in batches]
    variance = 8 / 7 * np.mean([s[1].reshape(-1) for s in stats], axis=0)
    np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_stddev.numpy(), np.sqrt(variance + 1e-3), rtol=1e-5)
    renorm_mean = np.zeros(3)
    for mean, _, _ in stats:
        renorm_mean = 0.5 * renorm_mean + 0.5 * mean.reshape(-1)
    np.testing.assert_allclose(layer.renorm_mean.numpy(), renorm_mean, rtol=1e-5, atol=1e-6)


def test_saved_model_export(tmp_path, rng):
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3),
                              kerasbn.BatchNormalization()])
    _train_on(model.layers[-1], [model.layers[0](b) for b in _batches(rng, 2, (8, 5))])
    path = str(tmp_path / "saved")
    model.export(path, verbose=False)
    restored = tf.saved_model.load(path)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    np.testing.assert_allclose(restored.serve(x).numpy(), model(x).numpy(), rtol=1e-6)


# --- Batch Renormalization ---------------------------------------------------------------------


def _training_steps(layer, batches, upstream):
    """Outputs, gradients (x, trainable weights) and all weights after each training step."""
    results = []
    for x in batches:
        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * upstream)
        grads = tape.gradient(loss, [x, *layer.trainable_weights])
        results.append([y.numpy(), *(g.numpy() for g in grads),
                        *(w.numpy() for w in layer.weights[:7])])
    return results


def test_trained_keras_renorm_layer_loads_and_continues_identically(tmp_path, rng):
    """A Keras renorm layer's config and weights (trained, so its renorm statistics are not
    the initial ones) load into ours, which then trains as Keras's does to 1e-5: outputs,
    gradients and all seven Keras weights, step by step."""
    shape = (8, 3, 3, 4)
    theirs = keras_batch_normalization(
        renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 0.5, "dmax": 0.5},
        renorm_momentum=0.7, momentum=0.8,
    )
    for x in _batches(rng, 4, shape):
        theirs(x, training=True)
    ours = kerasbn.BatchNormalization.from_config(
        {**theirs.get_config(), "unbiased_variance": False}
    )
    ours.build(shape)
    ours.set_weights(theirs.get_weights())
    assert [w.name for w in ours.weights[:7]] == [w.name for w in theirs.weights] == [
        "gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean",
        "renorm_stddev",
    ]
    batches = _batches(rng, 3, shape, location=4.0, scale=1.5)
    upstream = rng.standard_normal(shape).astype(np.float32)
    for step, (a, b) in enumerate(zip(_training_steps(ours, batches, upstream),
                                      _training_steps(theirs, batches, upstream), strict=True)):
        for index, (ours_value, keras_value) in enumerate(zip(a, b, strict=True)):
            np.testing.assert_allclose(
                ours_value, keras_value, rtol=1e-5,
                atol=1e-5 * max(1.0, np.abs(keras_value).max()), err_msg=f"{step}, {index}",
            )
    np.testing.assert_allclose(ours(batches[0]).numpy(), theirs(batches[0]).numpy(), rtol=1e-5,
                               atol=1e-5)

    # The weights-file route: a Keras model's file loads into the kerasbn model.
    def model_with(bn):
        return keras.Sequential([keras.Input(shape[1:]), bn])

    keras_model = model_with(keras.layers.BatchNormalization.from_config(theirs.get_config()))
    keras_model.set_weights(theirs.get_weights())
    path = str(tmp_path / "renorm.weights.h5")
    keras_model.save_weights(path)
    ours_model = model_with(kerasbn.BatchNormalization.from_config(theirs.get_config()))
    ours_model.load_weights(path)
    for a, b in zip(ours_model.layers[0].weights[:7], theirs.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_renorm_inference_is_plain_batch_normalization(rng):
    plain = kerasbn.BatchNormalization()
    renorm = kerasbn.BatchNormalization(renorm=True)
    x = _batches(rng, 1, (8, 3))[0]
    for layer in (plain, renorm):
        layer.build(x.shape)
        for name in ("gamma", "beta", "moving_mean", "moving_variance"):
            getattr(layer, name).assign(rng.uniform(0.5, 2.0, 3) if layer is plain else
                                        getattr(plain, name).numpy())
    np.testing.assert_array_equal(renorm(x).numpy(), plain(x).numpy())


def test_renorm_statistics_match_reference(rng):
    """unbiased_variance (default): the stddevs average √(m/(m−1)·σ²_B + ε), and the variance
    is derived from the stddev, as Keras derives it."""
    layer = kerasbn.BatchNormalization(renorm=True, momentum=0.6, renorm_momentum=0.3)
    batches = _batches(rng, 3, (6, 4))
    _train_on(layer, batches)
    mean, stddev, renorm_mean, renorm_stddev = np.zeros(4), np.ones(4), np.zeros(4), np.ones(4)
    for x in batches:
        batch_mean, batch_var, m = reference.moments(x, (1,))
        batch_std = np.sqrt(reference.unbiased(batch_var, m).reshape(-1) + 1e-3)
        mean = 0.6 * mean + 0.4 * batch_mean.reshape(-1)
        stddev = 0.6 * stddev + 0.4 * batch_std
        renorm_mean = 0.3 * renorm_mean + 0.7 * batch_mean.reshape(-1)
        renorm_stddev = 0.3 * renorm_stddev + 0.7 * batch_std
    for name, value in [("moving_mean", mean), ("moving_stddev", stddev),
                        ("moving_variance", np.maximum(stddev**2 - 1e-3, 0)),
                        ("renorm_mean", renorm_mean), ("renorm_stddev", renorm_stddev)]:
        np.testing.assert_allclose(getattr(layer, name).numpy(), value, rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_renorm_warmup_relaxes_clipping_linearly_from_plain_bn(rng):
    """rmax_t = 1 + t·(rmax − 1), rmin_t = 1 − t·(1 − rmin), dmax_t = t·dmax, t = min(step/n, 1):
    step 0 is plain BN, step n and later use the full bounds. Checked against the float64
    reference with renorm statistics far from the batch's, so every bound binds."""
    clipping = {"rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0}
    layer = kerasbn.BatchNormalization(
        renorm=True, renorm_clipping=clipping, renorm_momentum=1.0, renorm_warmup_steps=4,
    )
    x = _batches(rng, 1, (16, 3))[0]
    layer.build(x.shape)
    batch_mean, batch_var, _ = reference.moments(x, (1,))
    # σ_B/σ = 10 or 0.1 (r clips at rmax or rmin) and |μ_B − μ|/σ ≥ 10 (d clips at dmax).
    renorm_stddev = np.sqrt(batch_var.reshape(-1) + 1e-3) * np.array([0.1, 10.0, 0.1])
    layer.renorm_stddev.assign(renorm_stddev)
    renorm_mean = batch_mean.reshape(-1) + np.array([10, -100, -10]) * renorm_stddev
    layer.renorm_mean.assign(renorm_mean)
    ones, zeros, dy = np.ones(3), np.zeros(3), np.zeros_like(x)
    for step in range(6):
        t = min(step / 4, 1.0)
        bounds = (1 - t * (1 - clipping["rmin"]), 1 + t * 2.0, t * 5.0)
        y = layer(x, training=True).numpy()
        ref_y, _, _, _, r, d = reference.renorm(x, ones, zeros, dy, (1,), 1e-3, renorm_mean,
                                                renorm_stddev, *bounds)
        np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-4, err_msg=f"step {step}")
        np.testing.assert_allclose(r.reshape(-1), [bounds[1], bounds[0], bounds[1]], rtol=1e-6)
        np.testing.assert_allclose(np.abs(d.reshape(-1)), bounds[2], rtol=1e-6)
        assert int(layer.renorm_step.numpy()) == step + 1
    plain = reference.forward(x, ones, zeros, (1,), 1e-3)[0]
    layer.reset_statistics()
    layer.renorm_mean.assign(renorm_mean)
    layer.renorm_stddev.assign(renorm_stddev)
    np.testing.assert_allclose(layer(x, training=True).numpy(), plain, rtol=1e-5, atol=1e-5)


def test_renorm_refused_across_synchronizing_replicas(monkeypatch):
    """Under a multi-replica strategy, synchronized renorm or ghost batches are refused at the
    first training call (the synchronized kernel implements neither)."""
    from kerasbn import _sync

    monkeypatch.setattr(_sync, "synchronizing_replica_context", lambda: object())
    for kwargs in ({"renorm": True}, {"virtual_batch_size": 2}):
        layer = kerasbn.BatchNormalization(synchronized=True, **kwargs)
        layer.build((4, 3))
        before = [w.numpy() for w in layer.weights]
        with pytest.raises(ValueError, match=r"neither Batch Renormalization nor ghost batches"
                           r"\. Received: synchronized=True"):
            layer(np.ones((4, 3), np.float32), training=True)
        for value, variable in zip(before, layer.weights, strict=True):
            np.testing.assert_array_equal(value, variable.numpy())


# --- ghost batches -----------------------------------------------------------------------------


@pytest.mark.parametrize("unbiased_variance", [True, False])
def test_ghost_batches_statistics_and_inference(rng, unbiased_variance):
    """One update per batch from the groups pooled: mean = batch mean, variance = the mean
    within-group variance (biased) or Σ m_g σ²_g / Σ (m_g − 1) (unbiased). Inference is plain."""
    shape = (12, 3, 3, 2)
    layer = kerasbn.BatchNormalization(
        virtual_batch_size=4, momentum=0.0, unbiased_variance=unbiased_variance
    )
    x = _batches(rng, 1, shape)[0]
    x[4:8] += 5.0  # groups far apart: the within-group variance is well below the batch's
    y = layer(x, training=True).numpy()
    ones, zeros = np.ones(2), np.zeros(2)
    ref_y, _, _, _, mean, variance, m, dof = reference.ghost_batches(
        x, ones, zeros, np.zeros_like(x), (3,), 1e-3, 4
    )
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5)
    expected = variance * m / dof if unbiased_variance else variance
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected, rtol=1e-5)
    plain = kerasbn.BatchNormalization()
    plain.build(shape)
    plain.set_weights(layer.get_weights())
    np.testing.assert_array_equal(layer(x).numpy(), plain(x).numpy())


def test_ghost_batch_of_the_whole_batch_is_plain_bn(rng):
    x = _batches(rng, 1, (8, 5))[0]
    ghost, plain = kerasbn.BatchNormalization(virtual_batch_size=8), kerasbn.BatchNormalization()
    np.testing.assert_allclose(ghost(x, training=True).numpy(), plain(x, training=True).numpy(),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ghost.moving_variance.numpy(), plain.moving_variance.numpy(),
                               rtol=1e-6)


def test_ghost_batch_size_must_divide_the_batch():
    layer = kerasbn.BatchNormalization(virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"multiple of virtual_batch_size=4. Received: "
                       r"inputs.shape=\(6, 3\)"):
        layer(np.ones((6, 3), np.float32), training=True)
    assert int(layer.skipped_updates.numpy()) == 0
    # Known only at run time: the same message, before the kernel runs.
    step = tf.function(lambda x: layer(x, training=True),
                       input_signature=[tf.TensorSpec((None, 3), tf.float32)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="multiple of virtual_batch_size=4"):
        step(tf.ones((6, 3)))
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(3))
    step(tf.ones((8, 3)))  # and a good batch goes through the same trace
    # Inference takes any batch size.
    layer(np.ones((6, 3), np.float32))


@pytest.mark.parametrize("kwargs,shape,message", [
    ({"virtual_batch_size": 1}, (4, 3), r"ghost batch needs more than one value.*"
     r"Received: inputs.shape=\(1, 3\), virtual_batch_size=1"),
])
def test_ghost_batches_of_one_value_are_refused(kwargs, shape, message):
    layer = kerasbn.BatchNormalization(**kwargs)
    with pytest.raises(ValueError, match=message):
        layer(np.ones(shape, np.float32), training=True)


def test_ghost_batches_cannot_split_a_normalized_batch_axis():
    layer = kerasbn.BatchNormalization(axis=(0, 1), virtual_batch_size=2)
    with pytest.raises(ValueError, match=r"Received: axis=\(0, 1\), virtual_batch_size=2"):
        layer.build((4, 3))


@pytest.mark.parametrize("kwargs", [
    {}, {"statistics": "population"}, {"renorm": True}, {"virtual_batch_size": 2},
    {"activation": "relu"},
], ids=["moving_average", "population", "renorm", "ghost", "relu"])
def test_statistics_update_runs_inside_the_compiled_forward(kwargs):
    """Outside the kernel's XLA call, a training step has only reads, the variable writes and
    shape plumbing: none of the update's arithmetic (finite checks, selects, the averages)."""
    layer = kerasbn.BatchNormalization(**kwargs)
    layer.build((4, 3, 3, 2))
    step = tf.function(lambda x: layer(x, training=True))
    graph = step.get_concrete_function(tf.TensorSpec((4, 3, 3, 2))).graph
    outside = {op.type for op in graph.get_operations()}
    compiled = [
        op for op in graph.get_operations()
        if op.type in ("PartitionedCall", "StatefulPartitionedCall")
        and op.get_attr("_XlaMustCompile")
    ]
    assert compiled  # the forward (the backward is only built by a gradient)
    update_arithmetic = {"IsFinite", "All", "SelectV2", "Select", "Sqrt", "RealDiv", "Mul",
                         "AddV2", "Sub"}
    assert not outside & update_arithmetic, outside & update_arithmetic
    assert "AssignVariableOp" in outside


# --- the hook of the population pass: reporting_batch_moments, set_population_statistics ----


def _reporting_layer(rng, shape=(6, 4, 3), **kwargs):
    layer = kerasbn.BatchNormalization(**kwargs)
    layer.build((None, *shape))
    layer.gamma.assign(rng.uniform(0.5, 2.0, shape[-1]).astype("float32"))
    layer.beta.assign(rng.uniform(-1.0, 1.0, shape[-1]).astype("float32"))
    return layer


@pytest.mark.parametrize("activation", [None, "relu", "tanh"])
def test_reporting_batch_moments_gives_training_output_and_moments_and_updates_nothing(
    rng, activation
):
    """Whatever `training` says, the training-mode output (after the activation, fused or
    not) and the batch's moments, float64 reference; no variable changes."""
    layer = _reporting_layer(rng, activation=activation, statistics="population")
    x = _batches(rng, 1, (5, 6, 4, 3))[0]
    before = [w.copy() for w in layer.get_weights()]
    reports = []
    with layer.reporting_batch_moments(lambda *moments: reports.append(moments)):
        outputs = layer(x, training=False)
    z, mean, variance, count = reference.forward(
        x, layer.gamma.numpy(), layer.beta.numpy(), (3,), layer.epsilon
    )
    f = {None: lambda t: t, "relu": lambda t: np.maximum(t, 0.0), "tanh": np.tanh}[activation]
    np.testing.assert_allclose(outputs.numpy(), f(z), rtol=1e-4, atol=1e-5)
    ((reported_mean, reported_variance, reported_count),) = reports
    assert reported_mean.shape == (3,) and reported_mean.dtype == tf.float32
    np.testing.assert_allclose(reported_mean.numpy(), mean.reshape(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reported_variance.numpy(), variance.reshape(-1), rtol=1e-4)
    np.testing.assert_array_equal(reported_count.numpy(), count.reshape(-1))
    for after, expected in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(after, expected)
    # Outside the scope the layer is an inference layer again.
    np.testing.assert_allclose(
        layer(x).numpy(),
        f(reference.inference(x, layer.gamma.numpy(), layer.beta.numpy(), layer.moving_mean
                              .numpy(), layer.moving_variance.numpy(), (3,), layer.epsilon)),
        rtol=1e-4, atol=1e-5,
    )


def test_reporting_batch_moments_counts_unmasked_positions_only(rng):
    layer = _reporting_layer(rng, shape=(7, 3))
    x = _batches(rng, 1, (4, 7, 3))[0]
    mask = rng.uniform(size=(4, 7)) < 0.6
    reports = []
    with layer.reporting_batch_moments(lambda *moments: reports.append(moments)):
        layer(x, mask=tf.constant(mask))
    mean, variance, count = reference.moments(x, (2,), mask[..., None])
    np.testing.assert_allclose(reports[0][0].numpy(), mean.reshape(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reports[0][1].numpy(), variance.reshape(-1), rtol=1e-4)
    np.testing.assert_array_equal(reports[0][2].numpy(), count.reshape(-1))


def test_reporting_batch_moments_frozen_layer_reports_nothing(rng):
    layer = _reporting_layer(rng, shape=(3,))
    layer.trainable = False
    x = _batches(rng, 1, (8, 3))[0]
    reports = []
    with layer.reporting_batch_moments(lambda *moments: reports.append(moments)):
        outputs = layer(x, training=True)
    assert reports == []
    expected = reference.inference(x, layer.gamma.numpy(), layer.beta.numpy(), np.zeros(3),
                                   np.ones(3), (1,), layer.epsilon)
    np.testing.assert_allclose(outputs.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_reporting_batch_moments_bad_use(rng):
    layer = _reporting_layer(rng, shape=(3,))
    with pytest.raises(TypeError, match="Received: report='not callable'"):
        with layer.reporting_batch_moments("not callable"):
            pass
    with layer.reporting_batch_moments(print):
        with pytest.raises(ValueError, match="already reporting .*Received: report=<built-in "):
            with layer.reporting_batch_moments(len):
                pass
    assert layer._batch_moments_report is None  # the scope ended: inference again


@pytest.mark.parametrize("kwargs", [{"statistics": "population"}, {"renorm": True}, {}],
                         ids=["population", "renorm", "moving_average"])
def test_set_population_statistics_writes_what_the_layer_keeps(rng, kwargs):
    layer = _reporting_layer(rng, shape=(3,), **kwargs)
    mean, variance = np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.5, 2.5])
    count, dof = np.full(3, 40.0), np.full(3, 38.0)
    layer.set_population_statistics(mean, variance, count, dof)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean)
    np.testing.assert_allclose(layer.moving_variance.numpy(), variance)
    if kwargs.get("statistics") == "population":
        np.testing.assert_array_equal(layer.population_count.numpy(), count)
        np.testing.assert_array_equal(layer.population_dof.numpy(), dof)
    if kwargs.get("renorm"):
        np.testing.assert_allclose(layer.moving_stddev.numpy(), np.sqrt(variance + 1e-3),
                                   rtol=1e-6)
    assert int(layer.skipped_updates.numpy()) == 0


def test_set_population_statistics_refuses_before_writing(rng):
    layer = _reporting_layer(rng, shape=(3,), statistics="population")
    before = [w.copy() for w in layer.get_weights()]
    with pytest.raises(ValueError, match=r"Received: dof of shape \(4,\)"):
        layer.set_population_statistics(np.ones(3), np.ones(3), np.ones(3), np.ones(4))
    for after, expected in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(after, expected)
    with pytest.raises(ValueError, match="Received: an unbuilt layer"):
        kerasbn.BatchNormalization().set_population_statistics(*[np.ones(3)] * 4)


# --- tracing ------------------------------------------------------------------------------------

_EAGER_TRAINING_SCRIPT = """
import kerasbn_programs

kerasbn_programs.quiet_tensorflow_import()

import logging

import keras
import numpy as np

import kerasbn

warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("tensorflow").addHandler(handler)
layers = [keras.Input((12, 12, 3))]
for channels in (2, 3, 4, 5, 6, 7):
    layers += [keras.layers.Conv2D(channels, 3, padding="same"),
               kerasbn.BatchNormalization(activation="relu" if channels % 2 else None)]
    if channels % 2:
        layers.append(keras.layers.MaxPooling2D())
model = keras.Sequential([*layers, keras.layers.Flatten(), keras.layers.Dense(2)])
model.compile("sgd", "mse", run_eagerly=True)
x = np.random.default_rng(0).standard_normal((12, 12, 12, 3)).astype("float32")
model.fit(x, np.zeros((12, 2), "float32"), batch_size=4, epochs=1, verbose=0)
print(sum("retracing" in w for w in warnings))
"""


def test_training_a_model_with_many_bn_shapes_eagerly_warns_of_no_retracing():
    """Six BN layers of six shapes trained eagerly trace the compiled kernel six times (once
    per shape, as they must); TensorFlow warns of retracing when one function traces five
    times in a row, so the kernel must not show as one. A fresh process: TensorFlow counts
    traces per Python function for the life of the process and warns at most twice."""
    result = subprocess.run(
        [sys.executable, "-c", _EAGER_TRAINING_SCRIPT], capture_output=True, text=True,
        cwd=Path(__file__).parent.parent, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "0", result.stdout + result.stderr[-2000:]
