"""Every use of Keras internals in kerasbn, in one place.

Keras 3 has no public way to read a functional model's graph (which layer call made a tensor, the
calls in topological order), to run that graph with one layer's call replaced, to list the layers a
layer calls inside its own `call`, to read the values a layer's `save_own_variables` stored, or to
rebuild a layer with safe mode off in a scope. Each function below wraps one such assumption and
`tests/test_keras_compat.py` probes each one, so a Keras release that changes one fails one named
test instead of a user's export. Where a public API does the job (`model.layers`, `model.inputs`,
`model.outputs`), kerasbn uses it and not this module.
"""

from __future__ import annotations

import functools

import keras

# Keras has no public name for the class behind `keras.Model(inputs, outputs)`.
from keras.src.models.functional import Functional
from keras.src.saving.serialization_lib import SafeModeScope


def is_graph_model(layer):
    """Whether `layer` is a model whose layer graph can be read: Sequential or Functional."""
    return isinstance(layer, (keras.Sequential, Functional))


def is_functional(layer):
    return isinstance(layer, Functional)


def is_built_sequential(model):
    return isinstance(model, keras.Sequential) and model._functional is not None


def graph_nodes(model):
    """The call nodes of a Sequential or Functional model (not of its nested models), inputs
    first, model inputs left out. Each node has `operation`, `input_tensors`, `outputs`."""
    function = model._functional if isinstance(model, keras.Sequential) else model
    return [
        node
        for depth in sorted(function._nodes_by_depth, reverse=True)  # inputs first
        for node in function._nodes_by_depth[depth]
        if not node.is_input
    ]


def is_runnable_graph(layer):
    """Whether `run_graph` can run `layer`: a Functional model, or a Sequential one with its
    graph built (an input shape known)."""
    return is_functional(layer) or is_built_sequential(layer)


def run_graph(model, inputs, call_operation):
    """Runs the graph of a Functional or built Sequential `model` on `inputs` (in any structure
    the model takes), Keras's own way, except that each call node runs as
    `call_operation(operation, *args, **kwargs)` instead of `operation(*args, **kwargs)`.

    Keras's Functional runs its graph exactly so (`Functional.call` hands its
    `_run_through_graph` a per-operation function to pass `training` on); it has no public way
    to change how one layer of a graph is called.
    """
    function = model._functional if isinstance(model, keras.Sequential) else model
    outputs = function._run_through_graph(
        function._standardize_inputs(inputs),
        operation_fn=lambda operation: functools.partial(call_operation, operation),
    )
    return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs


def node_keyword_arguments(node):
    """The keyword arguments a layer was called with at this node (e.g. `training`)."""
    return node.arguments.kwargs


def producer(tensor):
    """(operation, node) that made a symbolic Keras tensor, or (None, None) for a model input."""
    history = tensor._keras_history
    operation = history.operation
    if operation is None or isinstance(operation, keras.layers.InputLayer):
        return None, None
    return operation, call_nodes(operation)[history.node_index]


def call_nodes(layer):
    """The nodes of every call of `layer` on symbolic tensors, in any model, in call order."""
    return layer._inbound_nodes


def layer_name(tensor):
    """The name of the layer that made a symbolic Keras tensor (an InputLayer's for an input)."""
    return tensor._keras_history.operation.name


def pack_inputs(model, tensors):
    """The flat list `tensors` (in the order of `model.inputs`) in the structure `model` takes:
    a Functional model may take a dict or a nested structure; others take one tensor or a list."""
    if isinstance(model, Functional):
        return keras.tree.pack_sequence_as(model._inputs_struct, tensors)
    return tensors[0] if len(tensors) == 1 else tensors


def sublayers(layer):
    """Every layer `layer` tracks below itself (recursively, each once), whether or not its
    graph shows the calls: the layer a TimeDistributed wraps, a subclassed layer's parts."""
    return layer._flatten_layers(include_self=False, recursive=True)


def saved_variables(store):
    """The values `layer.save_own_variables(store)` wrote, in the layer's variable order
    (trainable first): Keras keys them "0", "1", ... in that order."""
    return [store[str(i)] for i in range(len(store.keys()))]


def layer_from_config(layer_class, config):
    """`layer_class.from_config(config)` for a layer already in memory: its code is trusted
    already, so safe mode (which refuses a Lambda's function) would protect nothing."""
    with SafeModeScope(False):
        return layer_class.from_config(config)
