"""kerasbn.BatchNormalization next to keras.layers.BatchNormalization, case by case.

Each case of Keras's documented behaviour (arguments, masking, dtypes, training/trainable,
symbolic calls, serialization, mixed precision, Batch Renormalization) runs through one shared
invariant helper, `assert_matches_keras`: the same weights and inputs into both layers, then
outputs, gradients and every weight Keras has, step by step, in training and in inference;
the symbolic output; and the config. kerasbn runs with `unbiased_variance=False`, where it
promises Keras's behaviour.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from tests.helpers import keras_batch_normalization

# Where kerasbn deliberately differs: a fully masked training batch gives both layers the same
# (finite) outputs and gradients, but Keras then moves its moving averages towards 0 and 0, while
# kerasbn skips the update and counts it (`skipped_updates`).
KEEPS_STATISTICS = "keeps_statistics"


def _as_input(rng, shape, dtype, step):
    x = 2.0 + step + 3.0 * rng.standard_normal(shape)
    if np.dtype(dtype).kind in "ui":
        return tf.constant(np.clip(np.round(40 * x + 100), 0, 255), dtype)
    return tf.constant(x, dtype)


def _close(ours, theirs, dtype, what):
    ours = np.asarray(tf.cast(ours, "float64"))
    theirs = np.asarray(tf.cast(theirs, "float64"))
    assert ours.shape == theirs.shape, what
    # Relative to the array's magnitude: elementwise relative error means nothing near zero.
    # float16/bfloat16 outputs carry 3 and 2 decimal digits; float32 about 7, float64 about 16.
    tolerance = {"float16": 2e-3, "bfloat16": 1e-2, "float64": 1e-12}.get(str(dtype), 1e-5)
    scale = max(1.0, float(np.max(np.abs(theirs))))
    np.testing.assert_allclose(ours, theirs, rtol=tolerance, atol=tolerance * scale, err_msg=what)


def _training_step(layer, x, mask, upstream):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True, mask=mask)
        loss = tf.reduce_sum(tf.cast(y, "float32") * upstream)
    grads = tape.gradient(loss, [x, *layer.trainable_weights])
    return y, grads


def assert_matches_keras(
    rng, kwargs, shape, *, dtype="float32", layer_dtype=None, mask=None, steps=2,
    trainable=True, expect=None,
):
    """The invariant: kerasbn and Keras agree on everything Keras defines, for this case."""
    ours = kerasbn.BatchNormalization(unbiased_variance=False, dtype=layer_dtype, **kwargs)
    theirs = keras_batch_normalization(dtype=layer_dtype, **kwargs)
    for layer in (ours, theirs):
        layer.build(shape)
        layer.trainable = trainable
    # Same starting weights (random initializers draw differently), through Keras's order.
    for variable in theirs.weights:
        variable.assign(rng.uniform(0.5, 2.0, variable.shape))
    ours.set_weights(theirs.get_weights())
    assert [v.name for v in ours.weights[: len(theirs.weights)]] == [
        v.name for v in theirs.weights
    ]
    before = [w.numpy() for w in ours.weights]
    # Both compute in float64 only when inputs and layer are float64 (integer inputs are
    # computed in float32, whatever the layer's dtype); weights compare at that precision.
    working = "float64" if dtype == layer_dtype == "float64" else "float32"

    def precision(tensor_dtype):
        return working if str(tensor_dtype) in ("float32", "float64") else tensor_dtype

    upstream = tf.constant(rng.standard_normal(shape), "float32")
    mask = None if mask is None else tf.constant(mask)

    for step in range(steps):
        x = _as_input(rng, shape, dtype, step)
        (y_ours, g_ours), (y_theirs, g_theirs) = (
            _training_step(layer, x, mask, upstream) for layer in (ours, theirs)
        )
        assert y_ours.dtype == y_theirs.dtype
        assert np.all(np.isfinite(tf.cast(y_ours, "float64")))
        _close(y_ours, y_theirs, precision(y_theirs.dtype), f"training output, step {step}")
        for index, (a, b) in enumerate(zip(g_ours, g_theirs, strict=True)):
            if b is None:  # no gradient to the input (integer inputs): none from ours either
                assert a is None
                continue
            assert np.all(np.isfinite(tf.cast(a, "float64")))
            _close(a, b, precision(b.dtype), f"gradient {index}, step {step}")
        if expect == KEEPS_STATISTICS:
            for value, variable in zip(before, ours.weights, strict=False):
                if variable.name != "skipped_updates":
                    np.testing.assert_array_equal(variable.numpy(), value, variable.name)
            assert int(ours.skipped_updates.numpy()) == step + 1
            # Keras moved its statistics: start its next step from ours (renorm reads them).
            theirs.set_weights(ours.get_weights()[: len(theirs.weights)])
        else:
            for a, b in zip(ours.weights, theirs.weights, strict=False):
                _close(a.value, b.value, precision(b.dtype), f"{b.name}, step {step}")

    x = _as_input(rng, shape, dtype, steps)
    inference = [layer(x, training=False) for layer in (ours, theirs)]
    assert inference[0].dtype == inference[1].dtype
    # training=None (a plain call) is inference, as in Keras.
    np.testing.assert_array_equal(ours(x).numpy(), inference[0].numpy())
    if expect != KEEPS_STATISTICS:
        _close(*inference, precision(inference[1].dtype), "inference output")

    # Symbolic call: same output shape and dtype.
    symbolic = keras.Input(shape[1:], batch_size=shape[0], dtype=dtype)
    out_ours, out_theirs = ours(symbolic), theirs(symbolic)
    assert (out_ours.shape, out_ours.dtype) == (out_theirs.shape, out_theirs.dtype)

    # Serialization: every key of Keras's config, with Keras's value; and the config round
    # trips through both classes.
    ours_config, theirs_config = ours.get_config(), theirs.get_config()
    for key, value in theirs_config.items():
        if key != "name":
            assert ours_config[key] == value, key
    assert kerasbn.BatchNormalization.from_config(ours_config).get_config() == ours_config
    # (Keras before 3.14 has no renorm, nor the key.)
    renorm = theirs_config.get("renorm", False)
    assert kerasbn.BatchNormalization.from_config(theirs_config).renorm == renorm


CASES = {
    "dense": ({}, (16, 7)),
    "conv_channels_last": ({"momentum": 0.7}, (4, 5, 5, 3)),
    "channels_first": ({"axis": 1, "momentum": 0.5}, (4, 3, 6)),
    "rank5": ({"epsilon": 1e-5}, (2, 3, 4, 4, 2)),
    "no_center": ({"center": False}, (8, 4)),
    "no_scale": ({"scale": False}, (8, 4)),
    "neither": ({"center": False, "scale": False}, (8, 4)),
    "momentum_0": ({"momentum": 0.0}, (8, 4)),
    "momentum_1": ({"momentum": 1.0}, (8, 4)),
    "epsilon_0.1": ({"epsilon": 0.1}, (8, 4)),
    "initializers": ({"gamma_initializer": "random_normal", "beta_initializer": "ones",
                      "moving_mean_initializer": "ones",
                      "moving_variance_initializer": "zeros"}, (8, 4)),
    "regularizers": ({"gamma_regularizer": "l2", "beta_regularizer": "l1"}, (8, 4)),
    "constraints": ({"gamma_constraint": "non_neg", "beta_constraint": "max_norm"}, (8, 4)),
    "synchronized_no_strategy": ({"synchronized": True}, (8, 4)),
    "renorm": ({"renorm": True, "momentum": 0.5}, (8, 5)),
    "renorm_clipping": ({"renorm": True, "momentum": 0.5, "renorm_momentum": 0.6,
                         "renorm_clipping": {"rmax": 1.5, "rmin": 0.7, "dmax": 0.3}},
                        (4, 3, 3, 2)),
    "renorm_partial_clipping": ({"renorm": True, "renorm_clipping": {"dmax": 0.1}}, (8, 5)),
    "renorm_no_scale_no_center": ({"renorm": True, "scale": False, "center": False,
                                   "renorm_momentum": 0.3}, (8, 5)),
    "renorm_channels_first": ({"renorm": True, "axis": 1, "renorm_momentum": 0.5},
                              (4, 3, 5)),
}


@pytest.mark.parametrize("kwargs,shape", CASES.values(), ids=CASES.keys())
def test_arguments_match_keras(rng, kwargs, shape):
    assert_matches_keras(rng, kwargs, shape, steps=3)


def test_regularization_losses_match_keras(rng):
    kwargs = {"gamma_regularizer": "l2", "beta_regularizer": "l1"}
    layers = [cls(**kwargs) for cls in (kerasbn.BatchNormalization,
                                         keras.layers.BatchNormalization)]
    for layer in layers:
        layer.build((None, 4))
        layer.gamma.assign([1.0, -2.0, 3.0, 0.5])
        layer.beta.assign([0.1, -0.2, 0.3, 0.0])
    ours, theirs = ([float(loss) for loss in layer.losses] for layer in layers)
    assert ours == pytest.approx(theirs) and len(ours) == 2


def test_constraints_are_applied_like_keras(rng):
    """An optimizer step applies gamma's constraint as it does to Keras's gamma."""
    results = []
    for cls in (kerasbn.BatchNormalization, keras.layers.BatchNormalization):
        layer = cls(gamma_constraint="non_neg")
        layer.build((None, 3))
        layer.gamma.assign([1.0, -2.0, 3.0])
        optimizer = keras.optimizers.SGD(0.0)
        optimizer.apply_gradients([(tf.zeros(3), layer.gamma), (tf.zeros(3), layer.beta)])
        results.append(layer.gamma.numpy())
    np.testing.assert_array_equal(*results)
    np.testing.assert_array_equal(results[0], [1.0, 0.0, 3.0])


def _mask(rng, shape, kind):
    if kind == "partial":
        mask = rng.uniform(size=shape) < 0.6
        mask.reshape(-1)[:2] = True
        return mask
    if kind == "all_zero":
        return np.zeros(shape, bool)
    return np.ones(shape, bool)


@pytest.mark.parametrize("kind", ["partial", "all_zero", "all_one"])
@pytest.mark.parametrize("kwargs,shape", [
    ({"momentum": 0.5}, (4, 6, 3)),
    ({"center": False, "scale": False}, (4, 6, 3)),
    ({"renorm": True, "renorm_momentum": 0.5}, (4, 6, 3)),
    ({}, (2, 3, 4, 5)),  # a mask of rank 3 for a rank-4 input
], ids=["sequence", "no_affine", "renorm", "rank4"])
def test_masks_match_keras(rng, kwargs, shape, kind):
    mask = _mask(rng, shape[:-1], kind)
    expect = KEEPS_STATISTICS if kind == "all_zero" else None
    assert_matches_keras(rng, kwargs, shape, mask=mask, expect=expect)


@pytest.mark.parametrize("dtype,layer_dtype", [
    ("float64", "float64"),
    ("uint8", None),
    ("int32", None),
    ("float64", None),  # a float32 layer casts float64 inputs to float32, as Keras's does
    ("uint8", "float64"),
])
@pytest.mark.parametrize("kwargs", [{}, {"renorm": True, "renorm_momentum": 0.5}],
                         ids=["plain", "renorm"])
def test_dtypes_match_keras(rng, dtype, layer_dtype, kwargs):
    assert_matches_keras(rng, kwargs, (8, 3, 3, 2), dtype=dtype, layer_dtype=layer_dtype)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}], ids=["plain", "renorm"])
def test_mixed_precision_matches_keras(rng, policy, kwargs):
    keras.mixed_precision.set_global_policy(policy)
    dtype = policy.removeprefix("mixed_")
    assert_matches_keras(rng, kwargs, (8, 3, 3, 2), dtype=dtype)


@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}], ids=["plain", "renorm"])
def test_frozen_layer_runs_in_inference_mode_like_keras(rng, kwargs):
    """trainable=False: training=True runs in inference mode, no weight changes."""
    assert_matches_keras(rng, kwargs, (8, 4), trainable=False)


def test_float64_trains_to_float64_precision(rng):
    """dtype="float64": outputs, gradients and statistics to float64 precision (against the
    float64 NumPy reference, not only against Keras)."""
    from tests import reference

    layer = kerasbn.BatchNormalization(dtype="float64", momentum=0.0, epsilon=1e-3)
    # A mean that float32 statistics would lose digits of: 1e4 with σ = 1e-2.
    x = tf.constant(1e4 + 1e-2 * rng.standard_normal((16, 3)), "float64")
    dy = rng.standard_normal((16, 3))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * dy)
    dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
    assert y.dtype == dx.dtype == layer.moving_mean.dtype == "float64"
    ones, zeros = np.ones(3), np.zeros(3)
    ref_y, ref_mean, ref_var, m = reference.forward(x.numpy(), ones, zeros, (1,), 1e-3)
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(x.numpy(), ones, dy, (1,), 1e-3)
    np.testing.assert_allclose(y.numpy(), ref_y, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dx.numpy(), ref_dx, rtol=1e-9, atol=1e-9 * np.abs(ref_dx).max())
    np.testing.assert_allclose(dgamma.numpy(), ref_dgamma, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dbeta.numpy(), ref_dbeta, rtol=1e-12)
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref_mean.reshape(-1), rtol=1e-14)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), reference.unbiased(ref_var, m).reshape(-1), rtol=1e-9
    )


def test_fit_with_a_fully_masked_batch_keeps_weights_finite(rng):
    """A batch of padding only in `fit` (Masking → BN): finite weights, as with Keras's layer,
    and the statistics update of that batch skipped and counted."""
    x = (2.0 + rng.standard_normal((32, 5, 3))).astype(np.float32)
    x[8:16] = 0.0  # the second batch is all padding
    y = rng.standard_normal((32, 5, 1)).astype(np.float32)
    losses = []
    ours = kerasbn.BatchNormalization(unbiased_variance=False)
    for bn in (ours, keras.layers.BatchNormalization()):
        model = keras.Sequential([keras.Input((5, 3)), keras.layers.Masking(0.0), bn,
                                  keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.1), "mse")
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        assert all(np.all(np.isfinite(w)) for w in model.get_weights())
        losses.append(history.history["loss"])
    assert np.all(np.isfinite(losses[0]))
    assert int(ours.skipped_updates.numpy()) == 2  # one padding batch per epoch
    assert losses[0][-1] < losses[0][0]
