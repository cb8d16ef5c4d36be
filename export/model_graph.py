"""A read-only view of a Keras model's layer graph: its calls, who reads each tensor, nesting."""

from __future__ import annotations

import collections

import keras

from kerasbn import _keras_compat
from kerasbn.export.layouts import BN_CLASSES


def check_model(model):
    """TypeError/ValueError unless `model` is a built Sequential or Functional model."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"fold_batchnorm needs a Keras model. Received: model={model!r}")
    if not _keras_compat.is_graph_model(model):
        raise TypeError(
            "fold_batchnorm needs a Sequential or Functional model: a subclassed model does not "
            f"show how its layers connect. Received: model={model!r}"
        )
    if isinstance(model, keras.Sequential) and not _keras_compat.is_built_sequential(model):
        raise ValueError(
            "The Sequential model is not built: start it with keras.Input(shape) or call "
            f"model.build(input_shape) first. Received: model={model!r}"
        )


class ModelGraph:
    """The call nodes of one model (not of its nested models) and who reads each tensor."""

    def __init__(self, model):
        self.nodes = _keras_compat.graph_nodes(model)
        self.outputs = {id(t) for t in model.outputs}
        self.readers = collections.defaultdict(list)
        for node in self.nodes:
            for tensor in node.input_tensors:
                self.readers[id(tensor)].append(node)

    producer = staticmethod(_keras_compat.producer)

    def feeds_only(self, tensor, node):
        """Whether `node` is the one reader of `tensor` and `tensor` is not a model output."""
        return self.readers[id(tensor)] == [node] and id(tensor) not in self.outputs


def graphs(model):
    """(name prefix, ModelGraph) for `model` and each nested model, once each, outer first."""
    found, seen = [], set()

    def visit(model, prefix):
        # Once per model object: a block reused inside two sub-models is one graph.
        if id(model) in seen:
            return
        seen.add(id(model))
        check_model(model)
        graph = ModelGraph(model)
        found.append((prefix, graph))
        for node in graph.nodes:
            if _keras_compat.is_graph_model(node.operation):
                visit(node.operation, f"{prefix}{node.operation.name}/")

    visit(model, "")
    return found


def all_layers(model):
    """Every layer of `model` and its nested models, each once."""
    found = {}
    for layer in model.layers:
        found[id(layer)] = layer
        if _keras_compat.is_graph_model(layer):
            found.update((id(inner), inner) for inner in all_layers(layer))
    return list(found.values())


def count_bn(model):
    return sum(isinstance(layer, BN_CLASSES) for layer in all_layers(model))
