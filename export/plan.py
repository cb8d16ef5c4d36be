"""Plan every fold of a model before anything is built: match, check, compute new weights.

Every BN call (nested models included, in topological order) is matched with the layer before
it and the layer after it, its preconditions are checked (`kerasbn.export.preconditions`), and
the folded weights are computed (`kerasbn.export.fold`). The result is a `FoldPlan`: one record
per BN for the report, the BN layers to drop, and the new weights of the layers that take them.
"""

from __future__ import annotations

import collections
import dataclasses

import keras

from kerasbn import _keras_compat
from kerasbn.export import preconditions as checks
from kerasbn.export.fold import fold, fold_forward
from kerasbn.export.layouts import BN_CLASSES, PRODUCER_LAYOUTS
from kerasbn.export.model_graph import graphs
from kerasbn.export.report import FoldRecord


@dataclasses.dataclass(frozen=True)
class FoldPlan:
    """records: FoldRecords in topological order; removed: ids of BN layers folded away;
    weights: id of a layer → {variable name: new value}; activations: id of a producer → the
    serialized activation of the BN folded into it, which it applies from now on."""

    records: tuple
    removed: frozenset
    weights: dict
    activations: dict = dataclasses.field(default_factory=dict)


def plan_folds(model):
    """The `FoldPlan` of a built Sequential or Functional `model`; changes nothing."""
    planner = _Planner(model)
    return FoldPlan(
        tuple(planner.records), frozenset(planner.removed), planner.weights, planner.activations
    )


class _Planner:
    """Decides the fate of every BN call of a model; computes the folded weights.

    After construction: `records` (FoldRecords, in topological order), `removed` (ids of BN
    layers folded away), `weights` (id of a layer → {variable name: new value}) and
    `activations` (id of a producer → the activation it takes over from its BN).
    """

    def __init__(self, model):
        self.records = []
        self.removed = set()
        self.weights = {}
        self.activations = {}
        model_graphs = graphs(model)
        self.calls = collections.Counter(
            id(node.operation) for _, graph in model_graphs for node in graph.nodes
        )
        planned = set()  # a shared BN is refused once, at its first call
        for prefix, graph in model_graphs:
            for node in graph.nodes:
                operation = node.operation
                if isinstance(operation, BN_CLASSES) and id(operation) not in planned:
                    planned.add(id(operation))
                    self.records.append(self._plan_bn(graph, node, prefix))
                elif _calls_layers_itself(operation):
                    for bn in _hidden_bn_layers(operation, planned):
                        planned.add(id(bn))
                        self.records.append(_hidden_record(prefix, operation, bn))

    def _site(self, graph, bn_node, layer=None, node=None):
        return checks.Site(graph, bn_node.operation, bn_node, layer, node, self.calls)

    def _plan_bn(self, graph, bn_node, prefix):
        name = prefix + bn_node.operation.name
        producer, producer_node = graph.producer(bn_node.input_tensors[0])
        before = None if producer is None else producer.name
        refusal = checks.first_failure(checks.BN_CHECKS, self._site(graph, bn_node))
        if refusal:
            return FoldRecord(name, before, "refused", refusal)

        backward_refusal = None
        if type(producer) in PRODUCER_LAYOUTS:
            site = self._site(graph, bn_node, producer, producer_node)
            backward_refusal = checks.first_failure(checks.PRODUCER_CHECKS, site)
            backward_refusal = backward_refusal or self._fold_backward(site)
            if not backward_refusal:
                return FoldRecord(name, before, "folded")

        consumer, forward_refusal = self._try_forward(graph, bn_node)
        if not forward_refusal:
            return FoldRecord(name, consumer.name, "folded_forward")
        forward = f"and it cannot fold forward: {forward_refusal}"
        if backward_refusal:
            return FoldRecord(name, before, "refused", f"{backward_refusal}; {forward}")
        return FoldRecord(name, before, "kept", f"{checks.no_producer(producer)}; {forward}")

    def _try_forward(self, graph, bn_node):
        """(consumer, None) after folding into it, or (consumer or None, why not)."""
        readers = graph.readers[id(bn_node.outputs[0])]
        reader = readers[0] if len(readers) == 1 else None
        layer = None if reader is None else reader.operation
        site = self._site(graph, bn_node, layer, reader)
        refusal = checks.first_failure(checks.CONSUMER_CHECKS, site)
        return site.layer, refusal or self._fold_forward(site)

    def _fold_backward(self, site):
        """Check 12: fold into the producer; None on success, else why not."""
        layout = PRODUCER_LAYOUTS[type(site.layer)]
        values = self._current_weights(site.layer)
        kernel, bias = fold(
            values[layout.kernel],
            values.get("bias"),
            channel_axis=layout.channel_axis,
            **_bn_arguments(site.bn),
        )
        refusal = self._commit(site, values, layout.kernel, kernel, bias)
        # P had a linear activation (check 6): it now applies the BN's, as BN(relu) did.
        activation = checks.bn_activation(site.bn)
        if not refusal and activation is not keras.activations.linear:
            self.activations[id(site.layer)] = keras.activations.serialize(activation)
        return refusal

    def _fold_forward(self, site):
        """Check 19: fold into the consumer; None on success, else why not."""
        values = self._current_weights(site.layer)
        kernel, bias = fold_forward(
            values["kernel"],
            values.get("bias"),
            groups=getattr(site.layer, "groups", 1),
            **_bn_arguments(site.bn),
        )
        return self._commit(site, values, "kernel", kernel, bias)

    def _current_weights(self, layer):
        # A layer can take two folds, a BN before it and one after: forward first, since the
        # BN before it is earlier in topological order.
        return self.weights.get(id(layer)) or _variables(layer)

    def _commit(self, site, values, kernel_name, kernel, bias):
        refusal = checks.folded_weights_finite(site.layer, kernel, bias)
        if refusal:
            return refusal
        self.weights[id(site.layer)] = {**values, kernel_name: kernel, "bias": bias}
        self.removed.add(id(site.bn))
        return None


def _calls_layers_itself(operation):
    return isinstance(operation, keras.layers.Layer) and not (
        _keras_compat.is_graph_model(operation) or isinstance(operation, BN_CLASSES)
    )


def _hidden_bn_layers(layer, planned):
    """BN layers that `layer` (a wrapper such as TimeDistributed, or a subclassed layer or
    model) calls inside its own `call`, where the graph does not show them."""
    return [
        inner
        for inner in _keras_compat.sublayers(layer)
        if isinstance(inner, BN_CLASSES) and id(inner) not in planned
    ]


def _hidden_record(prefix, layer, bn):
    return FoldRecord(
        f"{prefix}{layer.name}/{bn.name}",
        None,
        "kept",
        f"it is called inside '{layer.name}' ({type(layer).__name__}), whose own code calls "
        "it; folds rewrite only the model's graph of layers",
    )


def _bn_arguments(bn):
    statistics = checks.statistics(bn)
    return dict(
        gamma=statistics["gamma"],
        beta=statistics["beta"],
        mean=statistics["moving_mean"],
        variance=statistics["moving_variance"],
        epsilon=bn.epsilon,
    )


def _variables(layer):
    return {v.name: keras.ops.convert_to_numpy(v) for v in layer.weights}
