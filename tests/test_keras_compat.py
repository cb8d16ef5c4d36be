"""One probe per Keras internal that kerasbn relies on (kerasbn/_keras_compat.py).

A Keras release that changes one of them fails the one test named after it here."""

import keras
import numpy as np
import pytest

from kerasbn import _keras_compat
from tests.helpers import Subclassed, keras_batch_normalization

L = keras.layers


def test_graph_models_are_sequential_and_functional_only():
    inputs = keras.Input((3,))
    functional = keras.Model(inputs, L.Dense(2)(inputs))
    sequential = keras.Sequential([keras.Input((3,)), L.Dense(2)])
    assert _keras_compat.is_graph_model(functional) and _keras_compat.is_functional(functional)
    assert _keras_compat.is_graph_model(sequential) and not _keras_compat.is_functional(sequential)
    assert not _keras_compat.is_graph_model(Subclassed())
    assert not _keras_compat.is_graph_model(L.Dense(2))


def test_a_sequential_is_built_once_it_has_an_input_shape():
    unbuilt = keras.Sequential([L.Dense(2)])
    assert not _keras_compat.is_built_sequential(unbuilt)
    unbuilt.build((None, 3))
    assert _keras_compat.is_built_sequential(unbuilt)


def test_graph_nodes_are_the_calls_inputs_first_raw_operations_included():
    inputs = keras.Input((3,))
    dense = L.Dense(2)
    hidden = dense(inputs)
    doubled = keras.ops.multiply(hidden, 2.0)
    model = keras.Model(inputs, doubled)
    nodes = _keras_compat.graph_nodes(model)
    assert [n.operation for n in nodes][0] is dense
    assert type(nodes[1].operation).__name__ == "Multiply"
    assert not isinstance(nodes[1].operation, L.Layer)
    assert nodes[1].input_tensors[0] is hidden and nodes[1].outputs[0] is doubled
    sequential = keras.Sequential([keras.Input((3,)), dense])
    assert [n.operation for n in _keras_compat.graph_nodes(sequential)] == [dense]


def test_node_keyword_arguments_keep_a_fixed_training_flag():
    inputs = keras.Input((3,))
    bn = L.BatchNormalization()
    model = keras.Model(inputs, bn(inputs, training=True))
    (node,) = _keras_compat.graph_nodes(model)
    assert _keras_compat.node_keyword_arguments(node)["training"] is True


def test_producer_of_a_tensor_is_its_layer_and_node():
    inputs = keras.Input((3,), name="x")
    dense = L.Dense(2, name="d")
    outputs = dense(inputs)
    keras.Model(inputs, outputs)
    layer, node = _keras_compat.producer(outputs)
    assert layer is dense and node.outputs[0] is outputs
    assert _keras_compat.producer(inputs) == (None, None)
    assert (_keras_compat.layer_name(inputs), _keras_compat.layer_name(outputs)) == ("x", "d")


def test_call_nodes_are_one_per_call_in_any_model():
    dense = L.Dense(2)
    first, second = keras.Input((3,)), keras.Input((3,))
    outputs = [dense(first), dense(second)]
    assert [node.outputs[0] for node in _keras_compat.call_nodes(dense)] == outputs
    dense(keras.Input((3,)))  # a call outside any model counts too
    assert len(_keras_compat.call_nodes(dense)) == 3


def test_pack_inputs_gives_the_structure_the_model_takes():
    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    model = keras.Model({"a": a, "b": b}, L.Concatenate()([a, b]))
    tensors = [np.ones((1, 2)), np.zeros((1, 3))]
    packed = _keras_compat.pack_inputs(model, tensors)
    assert set(packed) == {"a", "b"} and packed["b"].shape == (1, 3)
    sequential = keras.Sequential([keras.Input((2,)), L.Dense(1)])
    assert _keras_compat.pack_inputs(sequential, tensors[:1]) is tensors[0]


def test_sublayers_include_what_a_wrapper_calls():
    bn = L.BatchNormalization()
    wrapper = L.TimeDistributed(bn)
    assert bn in _keras_compat.sublayers(wrapper)
    assert wrapper not in _keras_compat.sublayers(wrapper)


class BatchNormalization(L.BatchNormalization):
    """Keras's layer, keeping what `saved_variables` reads from the store it loads from.
    (Named as Keras's: a weights file keeps each layer's variables under its class's name.)"""

    def load_own_variables(self, store):
        self.read = _keras_compat.saved_variables(store)
        super().load_own_variables(store)


@pytest.mark.parametrize("arguments", [{}, {"center": False}, {"renorm": True}],
                         ids=["plain", "no_beta", "renorm"])
def test_saved_variables_are_the_layer_variables_in_order(tmp_path, arguments):
    saved = keras_batch_normalization(**arguments)
    model = keras.Sequential([keras.Input((3,)), saved])
    for k, variable in enumerate(saved.variables):
        variable.assign(np.full((3,), float(k + 1)))
    expected = [v.numpy() for v in saved.trainable_variables + saved.non_trainable_variables]
    store = {}
    saved.save_own_variables(store)
    model.save_weights(tmp_path / "bn.weights.h5")
    loading = BatchNormalization(**arguments)
    keras.Sequential([keras.Input((3,)), loading]).load_weights(tmp_path / "bn.weights.h5")
    for values in (_keras_compat.saved_variables(store), loading.read):
        assert len(values) == len(expected) == len(saved.variables)
        for value, want in zip(values, expected, strict=True):
            np.testing.assert_array_equal(np.asarray(value), want)


def test_layer_from_config_rebuilds_a_lambda_with_safe_mode_on():
    layer = L.Lambda(lambda t: t * 2.0)
    config = layer.get_config()
    with pytest.raises(ValueError, match="safe_mode"):
        keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(layer), safe_mode=True
        )
    clone = _keras_compat.layer_from_config(L.Lambda, config)
    assert float(clone(np.ones((1,)))[0]) == 2.0


def test_run_graph_calls_each_node_through_the_given_function():
    inputs = keras.Input((3,), name="x")
    dense, relu = L.Dense(2), L.ReLU()
    functional = keras.Model(inputs, relu(dense(inputs)))
    sequential = keras.Sequential([keras.Input((3,)), dense, relu])
    assert _keras_compat.is_runnable_graph(functional)
    assert _keras_compat.is_runnable_graph(sequential)
    assert not _keras_compat.is_runnable_graph(keras.Sequential([L.Dense(2)]))
    assert not _keras_compat.is_runnable_graph(Subclassed())
    x = np.array([[1.0, -2.0, 3.0]], "float32")
    for model in (functional, sequential):
        called = []

        def call_operation(operation, *args, called=called, **kwargs):
            called.append(operation)
            outputs = operation(*args, **kwargs)
            return -outputs if operation is relu else outputs

        outputs = _keras_compat.run_graph(model, x, call_operation)
        assert called == [dense, relu]
        np.testing.assert_allclose(outputs, -model(x).numpy(), rtol=1e-6)
    # Several inputs, in the structure the model takes them (here a dict by input name).
    a, b = keras.Input((2,), name="a"), keras.Input((1,), name="b")
    joined = keras.Model([a, b], L.Concatenate()([a, b]))
    outputs = _keras_compat.run_graph(
        joined, {"a": np.ones((1, 2)), "b": np.zeros((1, 1))}, lambda op, *a, **k: op(*a, **k)
    )
    np.testing.assert_array_equal(outputs, [[1.0, 1.0, 0.0]])
