"""`BatchNormalization(activation=...)`: the layer equals BN followed by Keras's activation layer.

The invariant: for the same weights and inputs, kerasbn's BN with a (fused or fallback)
activation gives the outputs, the gradients (x, γ, β) and the stored statistics of Keras's BN
followed by `keras.layers.Activation`, in training and in inference, in every mode the layer has
(masks, renorm, ghost batches, mixed precision, frozen). The kernel's numbers against the
float64 reference are in tests/test_kernel.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from tests.helpers import keras_batch_normalization

FUSED = ["relu", "relu6", "sigmoid", "silu", "swish", "hard_silu", "hard_swish"]


def _pair(activation, bn_class=keras.layers.BatchNormalization, **kwargs):
    """(ours with the activation, BN of `bn_class` then Activation), same starting weights."""
    # unbiased_variance=False: where kerasbn promises Keras's statistics.
    ours = kerasbn.BatchNormalization(activation=activation, unbiased_variance=False, **kwargs)
    if bn_class is kerasbn.BatchNormalization:
        theirs_bn = bn_class(**kwargs, unbiased_variance=False)
    else:  # Keras's own layer; skipped where this Keras lacks an argument (renorm before 3.14)
        theirs_bn = keras_batch_normalization(**kwargs)
    return ours, theirs_bn, keras.layers.Activation(activation)


def _build_alike(rng, ours, theirs_bn, shape):
    for layer in (ours, theirs_bn):
        layer.build(shape)
    for variable in theirs_bn.weights:
        if variable.dtype.startswith("float"):
            variable.assign(rng.uniform(0.5, 2.0, variable.shape))
    ours.set_weights(theirs_bn.get_weights())


def _step(call, x, upstream, weights):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = call(x)
        loss = tf.reduce_sum(tf.cast(y, "float32") * upstream)
    return y, tape.gradient(loss, [x, *weights])


def _close(ours, theirs, tolerance, what):
    """float32: rtol 1e-5 and atol 1e-6 of the array's magnitude. Half types: the precision of
    the type relative to the magnitude (as tests/test_keras_parity.py), since Keras's
    activation and its gradient then run in float16/bfloat16 and the fused one in float32."""
    ours, theirs = (np.asarray(tf.cast(t, "float64")) for t in (ours, theirs))
    scale = max(1.0, float(np.max(np.abs(theirs))))
    atol = tolerance * scale / 10 if tolerance <= 1e-5 else tolerance * scale
    np.testing.assert_allclose(ours, theirs, rtol=tolerance, atol=atol, err_msg=what)


def assert_matches_bn_then_activation(
    rng, activation, shape, *, bn_class=keras.layers.BatchNormalization, mask=None,
    training=True, tolerance=1e-5, dtype="float32", steps=2, **kwargs,
):
    ours, theirs_bn, theirs_activation = _pair(activation, bn_class, **kwargs)
    _build_alike(rng, ours, theirs_bn, shape)
    upstream = tf.constant(rng.standard_normal(shape), "float32")
    mask = None if mask is None else tf.constant(mask)
    for step in range(steps):
        # Location and scale such that every activation's kinks and both its sides are reached.
        x = tf.constant(0.5 + step + 2.0 * rng.standard_normal(shape), dtype)
        y_ours, g_ours = _step(
            lambda x: ours(x, training=training, mask=mask), x, upstream, ours.trainable_weights
        )
        y_theirs, g_theirs = _step(
            lambda x: theirs_activation(theirs_bn(x, training=training, mask=mask)),
            x, upstream, theirs_bn.trainable_weights,
        )
        assert y_ours.dtype == y_theirs.dtype
        _close(y_ours, y_theirs, tolerance, f"output, step {step}")
        for index, (a, b) in enumerate(zip(g_ours, g_theirs, strict=True)):
            _close(a, b, tolerance, f"gradient {index}, step {step}")
        for a, b in zip(ours.weights, theirs_bn.weights, strict=False):
            _close(a.value, b.value, tolerance, f"{b.name}, step {step}")
    x = tf.constant(rng.standard_normal(shape), dtype)
    _close(ours(x, training=False), theirs_activation(theirs_bn(x, training=False)), tolerance,
           "inference output")
    return ours


@pytest.mark.parametrize("activation", FUSED)
def test_fused_activation_equals_bn_then_activation_layer(rng, activation):
    assert_matches_bn_then_activation(rng, activation, (8, 5, 5, 4))


@pytest.mark.parametrize("activation", ["gelu", "tanh", "elu"])
def test_other_activations_are_applied_after_the_kernel(rng, activation):
    ours = assert_matches_bn_then_activation(
        rng, activation, (8, 6)
    )
    assert ours._fused_activation is None


def test_large_tensor_takes_the_blockwise_sums_and_still_matches(rng):
    """(8, 16, 16, 64) is over the blockwise threshold: the derivative is applied in the loop."""
    assert_matches_bn_then_activation(rng, "relu", (8, 16, 16, 64),
                                      steps=1)


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_with_a_mask(rng, activation):
    mask = rng.uniform(size=(4, 6)) < 0.6
    mask[0, :2] = True
    assert_matches_bn_then_activation(rng, activation, (4, 6, 3), mask=mask)


@pytest.mark.parametrize("activation", ["relu", "hard_silu"])
def test_with_renorm(rng, activation):
    assert_matches_bn_then_activation(
        rng, activation, (8, 5), renorm=True, momentum=0.5,
        renorm_clipping={"rmax": 1.5, "rmin": 0.7, "dmax": 0.3},
    )


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_with_ghost_batches(rng, activation):
    """Keras 3 has no ghost batches: against kerasbn's own ghost BN, then the activation."""
    assert_matches_bn_then_activation(
        rng, activation, (8, 3, 3, 4), bn_class=kerasbn.BatchNormalization,
        virtual_batch_size=4,
    )


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_frozen_layer_applies_the_activation_after_the_inference_multiply_add(rng, activation):
    ours = assert_matches_bn_then_activation(
        rng, activation, (8, 4), trainable=False
    )
    assert not ours.trainable_weights


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(rng, policy):
    """The kernel applies f in float32 before the cast: within the half type's precision of
    Keras, which applies it to the cast output."""
    keras.mixed_precision.set_global_policy(policy)
    dtype = policy.removeprefix("mixed_")
    assert_matches_bn_then_activation(
        rng, "silu", (8, 3, 3, 2), dtype=dtype,
        tolerance={"float16": 2e-3, "bfloat16": 1e-2}[dtype],
    )


def test_synchronized_without_a_strategy_is_fused(rng):
    assert_matches_bn_then_activation(rng, "relu", (8, 4),
                                      synchronized=True)


def test_config_round_trip_and_weights_unchanged():
    layer = kerasbn.BatchNormalization(activation="swish")
    layer.build((None, 3))
    plain = kerasbn.BatchNormalization()
    plain.build((None, 3))
    assert [v.name for v in layer.weights] == [v.name for v in plain.weights]
    config = layer.get_config()
    assert config["activation"] == "silu"
    clone = kerasbn.BatchNormalization.from_config(config)
    assert clone.get_config() == config
    assert clone._fused_activation == "silu"
    assert kerasbn.BatchNormalization().get_config()["activation"] == "linear"
    # Keras BN's config (no activation key) still loads.
    assert kerasbn.BatchNormalization.from_config(
        keras.layers.BatchNormalization().get_config()
    ).activation is keras.activations.linear


def test_saved_model_round_trip(tmp_path, rng):
    model = keras.Sequential([keras.Input((4,)), kerasbn.BatchNormalization(activation="relu6")])
    model.layers[0].gamma.assign(rng.uniform(0.5, 2, 4))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = rng.standard_normal((5, 4)).astype("float32") * 4
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert loaded.layers[0]._fused_activation == "relu6"


@pytest.mark.parametrize("bad", ["no_such_activation", 3])
def test_bad_activation_is_refused_naming_the_argument(bad):
    with pytest.raises(ValueError, match=f"activation={bad!r}"):
        kerasbn.BatchNormalization(activation=bad)
