"""Fold inference-mode BatchNormalization layers of a Keras model into the layers next to them.

`fold_batchnorm(model)` returns a NEW model and a `FoldReport`; the model passed in is never
changed (its layers are cloned, weights copied, and the clone never shares a variable with it).

Before and after, for a BN after a producer P (kernel w, bias b) and, failing that, for a BN
before a consumer C (a Dense or a conv with padding="valid"):

    x ─► P(w, b) ─► BN(γ, β, mean, var, ε) ─► …      becomes      x ─► P(w', b') ─► …
    … ─► BN ─► C(w, b) ─► …                           becomes      … ─► C(w'', b'') ─► …

    backward:  w' = w·s,  b' = (b − mean)·s + β,  s = γ/√(var+ε)  (on P's output channels)
    forward:   w'' = w·s (on C's input channels),  b'' = b + Σ w·t,  t = β − mean·s

(details and the kernel layouts in `kerasbn.export.fold`). The folded model reproduces the
original in inference mode (`training=False`, as `predict` and the ONNX export run it).

The rewrite is match → can-fold check → rewrite. Every BN call (nested models included, in
topological order) is matched with the layer before it and the layer after it; all checks run
and all new weights are computed before the new model is built. Each failed check is one
record in the report, with a sentence saying why.

Preconditions, checked in this order (each is one function below and one test):

    For every BN (else "refused", the BN stays as it is):
    1. it is `keras.layers.BatchNormalization` or `kerasbn.BatchNormalization` itself (renorm
       and synchronized variants included), not a subclass whose call may differ;
    2. it is not called with training=True fixed in the graph (it would use batch statistics);
    3. the BN layer is called once in the model (a shared BN must keep working elsewhere);
    4. it normalizes a single axis (a kerasbn BN with several axes has no channel to fold on);
    5. γ, β, mean and variance are finite and variance + ε > 0.
    Folding backward into the producer P (P one of Dense; Conv1D/2D/3D; Conv1D/2D/3DTranspose;
    DepthwiseConv1D/2D; SeparableConv1D/2D, into its pointwise kernel; exact classes):
    6. P's activation is linear;
    7. P's kernel is a plain float kernel (no LoRA, not quantized);
    8. P is called once in the model (not shared);
    9. P's output feeds only this BN (no other layer, not a model output);
    10. the BN's axis is P's channel axis (last, or 1 for channels_first convs);
    11. P's bias is added on its channel axis (see `_misplaced_bias`: with this Keras, a
        channels_first conv whose last axis may have as many positions as it has channels adds
        its bias on the last axis, so a folded bias would land on the wrong axis);
    12. the folded kernel and bias are finite in P's dtype.
    Folding forward into the consumer C (one Dense or conv reads one tensor, so C reads only
    the BN's output), when P is not foldable or a check 6–12 failed:
    13. the BN's output feeds only C (one layer, not a model output);
    14. C is a Dense, or a Conv1D/2D/3D with padding="valid" (with zero padding, the borders
        would see 0 instead of t: not exact); exact classes;
    15. C's kernel is plain, as in 7;
    16. C is called once in the model;
    17. the BN's axis is C's input channel axis;
    18. C's bias is added on its channel axis, as in 11;
    19. the folded kernel and bias are finite in C's dtype.
    A BN with no foldable producer and no foldable consumer is "kept": it stays, in inference one
    per-channel multiply-add. A BN whose producer was foldable in kind but failed a check, and
    that cannot fold forward either, is "refused".

Folds do not cross the boundary of a nested model: its BN layers are folded inside it, and a BN
right after a nested model has no producer here. A BN that a layer calls inside its own `call`
(a `TimeDistributed` wrapper, a subclassed layer or model) is not in any graph: it is "kept" and
recorded with that reason. Raw operations in a functional graph (`keras.ops.add(x, y)`, the
`NotEqual` behind a Masking layer's mask) hold no state and are reused as they are.

Bad input (not a Keras model, a subclassed model, an unbuilt Sequential) raises
TypeError/ValueError; a broken invariant after the rewrite raises RuntimeError.
"""

from __future__ import annotations

from kerasbn import BatchNormalization as KerasbnBatchNormalization
from kerasbn import _keras_compat
from kerasbn._axes import normalize_axes
from kerasbn.export.fold import fold, fold_forward
from kerasbn.export.report import FoldRecord, FoldReport

import collections
import dataclasses
import functools

import keras
import numpy as np

_L = keras.layers
BN_CLASSES = (KerasbnBatchNormalization, _L.BatchNormalization)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a producer keeps its output channels: the variable, and the axes in it."""

    kernel: str
    channel_axis: int | tuple[int, ...]


# Exact classes: a subclass may compute something else with the same weights.
PRODUCER_LAYOUTS = {
    _L.Dense: _Layout("kernel", -1),
    **dict.fromkeys((_L.Conv1D, _L.Conv2D, _L.Conv3D), _Layout("kernel", -1)),
    **dict.fromkeys(
        (_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose), _Layout("kernel", -2)
    ),
    **dict.fromkeys((_L.DepthwiseConv1D, _L.DepthwiseConv2D), _Layout("kernel", (-2, -1))),
    **dict.fromkeys((_L.SeparableConv1D, _L.SeparableConv2D), _Layout("pointwise_kernel", -1)),
}
# Their kernels are all (*window, in_per_group, out): the layout `fold_forward` takes.
CONSUMER_CLASSES = (_L.Dense, _L.Conv1D, _L.Conv2D, _L.Conv3D)


def fold_batchnorm(model):
    """Fold every foldable inference-mode BN of `model` into its neighbour layer.

    Args:
        model: a built Sequential or Functional Keras model (nested models allowed).

    Returns:
        (folded_model, report): a new model of the same kind without the folded BN layers, and
        a `FoldReport` with one record per BN layer.
    """
    _check_model(model)
    planner = _Planner(model)
    report = FoldReport(tuple(planner.records))
    folded_model = _Rebuilder(planner).rebuild(model)
    _check_result(model, folded_model, report)
    return folded_model, report


# --- input -----------------------------------------------------------------------------------


def _check_model(model):
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


# --- the graph of one model level --------------------------------------------------------------


class _Graph:
    """The call nodes of one model (not of its nested models) and who reads each tensor."""

    def __init__(self, model):
        self.nodes = _keras_compat.graph_nodes(model)
        self.outputs = {id(t) for t in _keras_compat.graph_outputs(model)}
        self.readers = collections.defaultdict(list)
        for node in self.nodes:
            for tensor in node.input_tensors:
                self.readers[id(tensor)].append(node)

    producer = staticmethod(_keras_compat.producer)

    def feeds_only(self, tensor, node):
        """Whether `node` is the one reader of `tensor` and `tensor` is not a model output."""
        return self.readers[id(tensor)] == [node] and id(tensor) not in self.outputs


def _graphs(model):
    """(name prefix, _Graph) for `model` and each nested model, once each, outer first."""
    found, seen = [], set()

    def visit(model, prefix):
        # Once per model object: a block reused inside two sub-models is one graph.
        if id(model) in seen:
            return
        seen.add(id(model))
        _check_model(model)
        graph = _Graph(model)
        found.append((prefix, graph))
        for node in graph.nodes:
            if _keras_compat.is_graph_model(node.operation):
                visit(node.operation, f"{prefix}{node.operation.name}/")

    visit(model, "")
    return found


# --- what the checks look at ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Site:
    """One BN call and one neighbour (its producer or its consumer, or none)."""

    graph: _Graph
    bn: keras.layers.Layer
    bn_node: object
    layer: keras.layers.Layer | None
    node: object
    calls: collections.Counter  # id(layer) -> calls in the whole model, nested models included

    @property
    def bn_input(self):
        return self.bn_node.input_tensors[0]

    @property
    def bn_output(self):
        return self.bn_node.outputs[0]

    @property
    def bn_axes(self):
        return normalize_axes(self.bn.axis, len(self.bn_input.shape))


def _statistics(bn):
    """The BN's γ, β, mean and variance as NumPy arrays (None where the BN has none)."""
    names = ("gamma", "beta", "moving_mean", "moving_variance")
    variables = {name: getattr(bn, name, None) for name in names}
    return {n: None if v is None else keras.ops.convert_to_numpy(v) for n, v in variables.items()}


def _channel_axis(layer, rank):
    return 1 if getattr(layer, "data_format", None) == "channels_first" else rank - 1


def _first_failure(checks, site):
    for check in checks:
        reason = check(site)
        if reason:
            return reason
    return None


# --- preconditions 1–5: the BN itself ----------------------------------------------------------


def _bn_is_exact_class(site):
    if type(site.bn) not in BN_CLASSES:
        return (
            f"it is a {type(site.bn).__name__}, a subclass of BatchNormalization whose call may "
            "differ from the BN it would be folded as"
        )
    return None


def _bn_not_training(site):
    if _keras_compat.node_keyword_arguments(site.bn_node).get("training") is True:
        return (
            "it is called with training=True in the graph, so it normalizes with batch "
            "statistics, which no fixed kernel can reproduce"
        )
    return None


def _bn_called_once(site):
    calls = site.calls[id(site.bn)]
    if calls != 1:
        return f"the BN layer is called {calls} times (shared); its other calls need it unchanged"
    return None


def _bn_single_axis(site):
    if len(site.bn_axes) != 1:
        return (
            f"it normalizes several axes (axis={site.bn.axis!r}), so there is no single channel "
            "axis to fold into a kernel"
        )
    return None


def _bn_finite(site):
    statistics = _statistics(site.bn)
    bad = [n for n, v in statistics.items() if v is not None and not np.isfinite(v).all()]
    if bad:
        return f"its {', '.join(bad)} contain NaN or infinity"
    if not (statistics["moving_variance"] + site.bn.epsilon > 0).all():
        return "moving_variance + epsilon is not positive for some channel"
    return None


BN_CHECKS = (_bn_is_exact_class, _bn_not_training, _bn_called_once, _bn_single_axis, _bn_finite)


# --- preconditions 6–11 and 13–18: the neighbour ----------------------------------------------


def _linear_activation(site):
    activation = getattr(site.layer, "activation", keras.activations.linear)
    if activation is not keras.activations.linear:
        name = getattr(activation, "__name__", repr(activation))
        return (
            f"'{site.layer.name}' applies the activation '{name}' before the BN, and a "
            "nonlinearity cannot be moved through"
        )
    return None


def _plain_kernel(site):
    layer = site.layer
    if getattr(layer, "lora_enabled", False):
        return f"'{layer.name}' has LoRA enabled; merge it into the kernel first"
    mode = getattr(layer, "quantization_mode", None)
    if mode is not None:
        return f"'{layer.name}' is quantized ({mode}), and a folded kernel would need requantizing"
    return None


def _neighbour_called_once(site):
    calls = site.calls[id(site.layer)]
    if calls != 1:
        return (
            f"'{site.layer.name}' is called {calls} times (a shared layer); its other calls "
            "need its weights unchanged"
        )
    return None


def _producer_feeds_only_bn(site):
    output = site.node.outputs[0]
    if site.graph.feeds_only(output, site.bn_node):
        return None
    readers = [n.operation.name for n in site.graph.readers[id(output)] if n is not site.bn_node]
    if id(output) in site.graph.outputs:
        readers.append("the model output")
    return (
        f"the output of '{site.layer.name}' also feeds {', '.join(readers)}, which must keep "
        "seeing it unnormalized"
    )


def _producer_channel_axis(site):
    rank = len(site.node.outputs[0].shape)
    channel_axis = _channel_axis(site.layer, rank)
    if site.bn_axes != (channel_axis,):
        return (
            f"the BN normalizes axis {site.bn_axes[0]}, but '{site.layer.name}' keeps its "
            f"channels on axis {channel_axis}"
        )
    return None


@functools.cache
def _keras_misplaces_channels_first_bias():
    """Whether this Keras adds a (1, C, 1, …) bias on the LAST axis of x when that axis also has
    C positions. Keras 3's TensorFlow `ops.add` takes such a y for a bias and calls
    `tf.nn.bias_add` with NHWC whenever x's last axis matches (3.15 does); every conv layer adds
    its channels_first bias through it."""
    x = keras.ops.zeros((1, 2, 2))
    bias = keras.ops.reshape(keras.ops.arange(2.0), (1, 2, 1))
    return not np.array_equal(keras.ops.convert_to_numpy(keras.ops.add(x, bias))[0, :, 0], [0, 1])


def _misplaced_bias(layer, output_shape):
    """Why a bias given to `layer` would not land on its channels, or None (checks 11 and 18).

    A bias changed by a fold then differs per position along the last axis instead of per
    channel. The last axis's size is a risk when unknown (an eager call may bring C)."""
    if getattr(layer, "data_format", None) != "channels_first":
        return None
    channels, last = output_shape[1], output_shape[-1]
    if last not in (None, channels) or not _keras_misplaces_channels_first_bias():
        return None
    size = "an unknown number of" if last is None else f"{last}"
    return (
        f"'{layer.name}' is channels_first and its output's last axis has {size} positions, "
        f"where it has {channels} channels: this Keras (keras.ops.add → tf.nn.bias_add NHWC) then "
        "adds its bias on the last axis, so a folded bias would land on the wrong axis"
    )


def _bias_on_channels(site):
    return _misplaced_bias(site.layer, site.node.outputs[0].shape)


PRODUCER_CHECKS = (
    _linear_activation,
    _plain_kernel,
    _neighbour_called_once,
    _producer_feeds_only_bn,
    _producer_channel_axis,
    _bias_on_channels,
)


def _consumer_is_foldable(site):
    layer = site.layer
    if type(layer) not in CONSUMER_CLASSES:
        return (
            f"'{layer.name}' after it ({type(layer).__name__}) is not a Dense or a "
            "Conv1D/2D/3D"
        )
    if getattr(layer, "padding", "valid") != "valid":
        return (
            f"'{layer.name}' after it uses padding='{layer.padding}': its zero padding would "
            "stand for BN outputs of 0, which a fold cannot keep, so only padding='valid' is exact"
        )
    return None


def _consumer_channel_axis(site):
    channel_axis = _channel_axis(site.layer, len(site.bn_output.shape))
    if site.bn_axes != (channel_axis,):
        return (
            f"the BN normalizes axis {site.bn_axes[0]}, but '{site.layer.name}' after it reads "
            f"its channels on axis {channel_axis}"
        )
    return None


CONSUMER_CHECKS = (
    _consumer_is_foldable,
    _plain_kernel,
    _neighbour_called_once,
    _consumer_channel_axis,
    _bias_on_channels,
)


# --- planning: every check and every new weight, before anything is built ---------------------


class _Planner:
    """Decides the fate of every BN call of a model; computes the folded weights.

    After construction: `records` (FoldRecords, in topological order), `removed` (ids of BN
    layers folded away) and `weights` (id of a layer → {variable name: new value}).
    """

    def __init__(self, model):
        self.records = []
        self.removed = set()
        self.weights = {}
        graphs = _graphs(model)
        self.calls = collections.Counter(
            id(node.operation) for _, graph in graphs for node in graph.nodes
        )
        planned = set()  # a shared BN is refused once, at its first call
        for prefix, graph in graphs:
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
        return _Site(graph, bn_node.operation, bn_node, layer, node, self.calls)

    def _plan_bn(self, graph, bn_node, prefix):
        name = prefix + bn_node.operation.name
        producer, producer_node = graph.producer(bn_node.input_tensors[0])
        before = None if producer is None else producer.name
        refusal = _first_failure(BN_CHECKS, self._site(graph, bn_node))
        if refusal:
            return FoldRecord(name, before, "refused", refusal)

        backward_refusal = None
        if type(producer) in PRODUCER_LAYOUTS:
            site = self._site(graph, bn_node, producer, producer_node)
            backward_refusal = _first_failure(PRODUCER_CHECKS, site) or self._fold_backward(site)
            if not backward_refusal:
                return FoldRecord(name, before, "folded")

        consumer, forward_refusal = self._try_forward(graph, bn_node)
        if not forward_refusal:
            return FoldRecord(name, consumer.name, "folded_forward")
        forward = f"and it cannot fold forward: {forward_refusal}"
        if backward_refusal:
            return FoldRecord(name, before, "refused", f"{backward_refusal}; {forward}")
        return FoldRecord(name, before, "kept", f"{_no_producer(producer)}; {forward}")

    def _try_forward(self, graph, bn_node):
        """(consumer, None) after folding into it, or (consumer or None, why not)."""
        output = bn_node.outputs[0]
        readers = graph.readers[id(output)]
        if not graph.feeds_only(output, readers[0] if readers else None):
            return None, _not_one_reader(graph, output)
        site = self._site(graph, bn_node, readers[0].operation, readers[0])
        return site.layer, _first_failure(CONSUMER_CHECKS, site) or self._fold_forward(site)

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
        return self._commit(site, values, layout.kernel, kernel, bias)

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
        if not (np.isfinite(kernel).all() and np.isfinite(bias).all()):
            return (
                f"the folded weights of '{site.layer.name}' overflow {kernel.dtype} (the BN "
                "scale γ/√(variance+ε) is too large)"
            )
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
    statistics = _statistics(bn)
    return dict(
        gamma=statistics["gamma"],
        beta=statistics["beta"],
        mean=statistics["moving_mean"],
        variance=statistics["moving_variance"],
        epsilon=bn.epsilon,
    )


def _variables(layer):
    return {v.name: keras.ops.convert_to_numpy(v) for v in layer.weights}


def _no_producer(producer):
    if producer is None:
        return "it reads a model input, with no layer before it to fold into"
    if _keras_compat.is_graph_model(producer):
        return (
            f"'{producer.name}' before it is a nested model, and folds do not cross model "
            "boundaries"
        )
    return f"'{producer.name}' before it ({type(producer).__name__}) has no kernel to fold into"


def _not_one_reader(graph, output):
    readers = graph.readers[id(output)]
    if id(output) in graph.outputs:
        return "its output is a model output"
    names = ", ".join(n.operation.name for n in readers)
    return f"its output feeds {len(readers)} layers ({names})"


# --- rewrite ------------------------------------------------------------------------------------


class _Bypass:
    """Stands for a folded BN while the new graph is built: calling it returns its input."""


def _call(layer, *args, **kwargs):
    if isinstance(layer, _Bypass):
        return args[0] if args else kwargs["inputs"]
    return layer(*args, **kwargs)


def _new_input(tensor):
    """A fresh Input like `tensor`, named after its InputLayer (clone_model would name it after
    the tensor, and input names reach the ONNX graph)."""
    return keras.Input(
        batch_shape=tensor.shape, dtype=tensor.dtype, name=_keras_compat.layer_name(tensor)
    )


class _Rebuilder:
    """Builds the folded model from a plan: clones every layer (nested models recursively),
    leaves out the folded BN layers, then loads copied or folded weights."""

    def __init__(self, plan):
        self.plan = plan
        self.clones = {}  # id(old layer) -> new layer: a shared layer stays shared
        self.pairs = []  # (old, new) layers whose weights are loaded once all are built

    def rebuild(self, model):
        new_model = self._clone(model)
        for old, new in self.pairs:
            self._load_weights(old, new)
        return new_model

    def _clone(self, layer):
        if id(layer) not in self.clones:
            self.clones[id(layer)] = self._new_layer(layer)
        return self.clones[id(layer)]

    def _new_layer(self, layer):
        if id(layer) in self.plan.removed:
            return _Bypass()
        if not isinstance(layer, keras.layers.Layer):
            # A raw operation in a functional graph (`keras.ops.add`, the `NotEqual` behind a
            # Masking layer's mask): it holds no state, so the new graph can call it as it is.
            return layer
        if isinstance(layer, keras.Sequential):
            return self._rebuild_sequential(layer)
        if _keras_compat.is_functional(layer):
            return keras.models.clone_model(
                layer,
                input_tensors=keras.tree.map_structure(_new_input, layer.input),
                clone_function=self._clone,
                call_function=_call,
            )
        config = layer.get_config()
        if id(layer) in self.plan.weights:
            config["use_bias"] = True  # a fold always gives the layer a bias
        new = _keras_compat.layer_from_config(type(layer), config)
        self.pairs.append((layer, new))
        return new

    def _rebuild_sequential(self, model):
        layers = [self._clone(layer) for layer in model.layers]
        new = keras.Sequential(
            [
                _new_input(model.inputs[0]),
                *(layer for layer in layers if not isinstance(layer, _Bypass)),
            ],
            name=model.name,
            trainable=model.trainable,
        )
        if model.compiled:  # as clone_model does for Functional models
            new.compile_from_config(model.get_compile_config())
        return new

    def _load_weights(self, old, new):
        folded = self.plan.weights.get(id(old))
        if folded is None:
            new.set_weights(old.get_weights())
            return
        for variable in new.weights:
            variable.assign(folded[variable.name])


# --- invariants -------------------------------------------------------------------------------


def _all_layers(model):
    """Every layer of `model` and its nested models, each once."""
    found = {}
    for layer in model.layers:
        found[id(layer)] = layer
        if _keras_compat.is_graph_model(layer):
            found.update((id(inner), inner) for inner in _all_layers(layer))
    return list(found.values())


def _count_bn(model):
    return sum(isinstance(layer, BN_CLASSES) for layer in _all_layers(model))


def _check_result(model, folded_model, report):
    expected = _count_bn(model) - len(report.folded)
    found = _count_bn(folded_model)
    if found != expected:
        raise RuntimeError(
            f"Folding should leave {expected} BatchNormalization layers but left {found}. "
            f"Received: model={model.name!r}\n{report}"
        )
    shared = {id(v) for v in model.weights} & {id(v) for v in folded_model.weights}
    if shared:
        raise RuntimeError(
            f"The folded model shares {len(shared)} variables with the original. "
            f"Received: model={model.name!r}"
        )
