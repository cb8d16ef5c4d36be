"""The Keras layer contract, in the spirit of Keras's own `run_layer_test`, for every mode.

What every Keras layer promises, checked for kerasbn.BatchNormalization in each statistics mode,
with Batch Renormalization and with ghost batches:
symbolic and eager calls agree on shape and dtype; the weights have Keras's names, counts and
trainability; config and saved-model round trips give the same layer and the same outputs; mixed
precision computes in float16 with float32 variables; a compiled training step trains; a frozen
layer (trainable=False) has no trainable weights and runs in inference mode.
"""

import keras
import numpy as np
import pytest

import kerasbn

MODES = {
    "moving_average": ({}, ["moving_mean", "moving_variance", "skipped_updates"]),
    "population": (
        {"statistics": "population"},
        ["moving_mean", "moving_variance", "skipped_updates", "population_count",
         "population_dof"],
    ),
    "renorm": (
        {"renorm": True, "renorm_clipping": {"rmax": 3.0, "dmax": 5.0},
         "renorm_warmup_steps": 10},
        ["moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev",
         "skipped_updates", "renorm_step"],
    ),
    "ghost_batches": (
        {"virtual_batch_size": 2},
        ["moving_mean", "moving_variance", "skipped_updates"],
    ),
}
SHAPE = (6, 4, 5)


def inputs(seed=0):
    return np.random.default_rng(seed).normal(3.0, 2.0, SHAPE).astype("float32")


@pytest.fixture(params=MODES, ids=MODES)
def mode(request):
    return MODES[request.param]


def test_symbolic_and_eager_calls_agree(mode):
    arguments, _ = mode
    layer = kerasbn.BatchNormalization(**arguments)
    symbolic = layer(keras.KerasTensor((None, *SHAPE[1:])))
    assert symbolic.shape == (None, *SHAPE[1:]) and symbolic.dtype == "float32"
    for training in (False, True):
        eager = layer(inputs(), training=training)
        assert tuple(eager.shape) == SHAPE and keras.backend.standardize_dtype(eager.dtype) == (
            symbolic.dtype
        )
    assert layer.compute_output_shape(SHAPE) == SHAPE


def test_weights_have_keras_names_counts_and_trainability(mode):
    arguments, non_trainable = mode
    layer = kerasbn.BatchNormalization(**arguments)
    layer.build(SHAPE)
    assert [w.name for w in layer.trainable_weights] == ["gamma", "beta"]
    assert [w.name for w in layer.non_trainable_weights] == non_trainable
    assert [w.name for w in layer.weights][:4] == ["gamma", "beta", "moving_mean",
                                                  "moving_variance"]
    plain = kerasbn.BatchNormalization(center=False, scale=False, **arguments)
    plain.build(SHAPE)
    assert plain.trainable_weights == []


def test_config_round_trip(mode):
    arguments, _ = mode
    layer = kerasbn.BatchNormalization(axis=1, momentum=0.9, epsilon=1e-4, **arguments)
    clone = kerasbn.BatchNormalization.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_saved_model_round_trip_gives_the_same_outputs(mode, tmp_path):
    arguments, _ = mode
    model = keras.Sequential([keras.Input(SHAPE[1:]), kerasbn.BatchNormalization(**arguments)])
    model(inputs(1), training=True)  # statistics away from their initial values
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    for weight, loaded_weight in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(weight.numpy(), loaded_weight.numpy())
    np.testing.assert_array_equal(model.predict(inputs(), verbose=0),
                                  loaded.predict(inputs(), verbose=0))


def test_mixed_precision_computes_in_float16_with_float32_variables(mode):
    arguments, _ = mode
    keras.mixed_precision.set_global_policy("mixed_float16")
    layer = kerasbn.BatchNormalization(**arguments)
    for training in (False, True):
        outputs = layer(inputs(), training=training)
        assert keras.backend.standardize_dtype(outputs.dtype) == "float16"
    assert all(w.dtype in ("float32", "int64") for w in layer.weights)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_a_compiled_training_step_trains(mode, jit_compile):
    arguments, _ = mode
    bn = kerasbn.BatchNormalization(**arguments)
    model = keras.Sequential([keras.Input(SHAPE[1:]), keras.layers.Dense(3), bn])
    model.compile("sgd", "mse", jit_compile=jit_compile)
    before = {w.name: w.numpy().copy() for w in bn.weights}
    model.fit(inputs(), np.ones((*SHAPE[:2], 3)), batch_size=SHAPE[0], epochs=1, verbose=0)
    changed = {w.name for w in bn.weights if not np.array_equal(w.numpy(), before[w.name])}
    assert {"gamma", "beta", "moving_mean", "moving_variance"} <= changed
    assert "skipped_updates" not in changed
    if "renorm_step" in before:
        assert bn.renorm_step.numpy() == 1


def test_a_frozen_layer_has_no_trainable_weights_and_runs_in_inference(mode):
    arguments, _ = mode
    layer = kerasbn.BatchNormalization(**arguments)
    layer.build(SHAPE)
    layer.trainable = False
    assert layer.trainable_weights == [] and len(layer.non_trainable_weights) == len(layer.weights)
    statistics = [w.numpy().copy() for w in layer.non_trainable_weights]
    np.testing.assert_array_equal(layer(inputs(), training=True), layer(inputs(), training=False))
    for before, weight in zip(statistics, layer.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(before, weight.numpy())
