"""The preconditions of a fold: each one small predicate that returns why not, or None.

A check takes a `Site` (one BN call and the neighbour it would fold into) and returns a sentence
for the report when the fold must not happen. `PRECONDITIONS` is the numbered list below, in the
order the planner (`kerasbn.export.plan`) runs them; `tests/test_folding.py` checks that this list,
the code and its grid of refusal cases stay in step.

    For every BN (else "refused", the BN stays as it is):
    1. `bn_is_exact_class`: it is `keras.layers.BatchNormalization` or
       `kerasbn.BatchNormalization` itself (renorm and synchronized variants included), not a
       subclass whose call may differ;
    2. `bn_not_training`: it is not called with training=True fixed in the graph (it would use
       batch statistics);
    3. `bn_called_once`: the BN layer is called once in the model (a shared BN must keep working
       elsewhere);
    4. `bn_single_axis`: it normalizes a single axis (a kerasbn BN with several axes has no
       channel to fold on);
    5. `bn_finite`: γ, β, mean and variance are finite and variance + ε > 0.
    Folding backward into the producer P (a class in `layouts.PRODUCER_LAYOUTS`); a BN with
    an activation (kerasbn's `activation`) hands it over to P, which then applies it:
    6. `linear_activation`: P's activation is linear;
    7. `plain_kernel`: P's kernel is a plain float kernel (no LoRA, not quantized);
    8. `neighbour_called_once`: P is called once in the model (not shared);
    9. `producer_feeds_only_bn`: P's output feeds only this BN (no other layer, not a model
       output);
    10. `producer_channel_axis`: the BN's axis is P's channel axis (last, or 1 for
        channels_first convs);
    11. `bias_on_channels`: P's bias is added on its channel axis (with Keras 3.15, a
        channels_first conv whose last axis may have as many positions as it has channels adds
        its bias on the last axis, so a folded bias would land on the wrong axis);
    12. `folded_weights_finite`: the folded kernel and bias are finite in P's dtype.
    Folding forward into the consumer C, when P is not foldable or a check 6–12 failed:
    13. `bn_linear_activation`: the BN applies no activation (kerasbn's `activation`): the
        multiply-add would have to move through the nonlinearity between the BN and C;
    14. `bn_feeds_only_consumer`: the BN's output feeds one layer C, and is not a model output;
    15. `consumer_is_foldable`: C is a Dense, or a Conv1D/2D/3D with padding="valid" (with zero
        padding, the borders would see 0 instead of t: not exact); exact classes;
    16. `plain_kernel`: C's kernel is plain, as in 7;
    17. `neighbour_called_once`: C is called once in the model;
    18. `consumer_channel_axis`: the BN's axis is C's input channel axis;
    19. `bias_on_channels`: C's bias is added on its channel axis, as in 11;
    20. `folded_weights_finite`: the folded kernel and bias are finite in C's dtype.

A BN with no foldable producer and no foldable consumer is "kept": it stays, in inference one
per-channel multiply-add. A BN whose producer was foldable in kind but failed a check, and that
cannot fold forward either, is "refused".
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import keras
import numpy as np

from kerasbn import _keras_compat
from kerasbn._axes import normalize_axes
from kerasbn.export.layouts import BN_CLASSES, CONSUMER_CLASSES, channel_axis
from kerasbn.export.model_graph import ModelGraph


@dataclasses.dataclass(frozen=True)
class Site:
    """One BN call and one neighbour (its producer or its consumer, or none)."""

    graph: ModelGraph
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


def statistics(bn):
    """The BN's γ, β, mean and variance as NumPy arrays (None where the BN has none)."""
    names = ("gamma", "beta", "moving_mean", "moving_variance")
    variables = {name: getattr(bn, name, None) for name in names}
    return {n: None if v is None else keras.ops.convert_to_numpy(v) for n, v in variables.items()}


def first_failure(checks, site):
    """The first reason among `checks` why the fold of `site` must not happen, or None."""
    for check in checks:
        reason = check(site)
        if reason:
            return reason
    return None



# --- 1–5: the BN itself ----------------------------------------------------------------------


def bn_is_exact_class(site):
    if type(site.bn) not in BN_CLASSES:
        return (
            f"it is a {type(site.bn).__name__}, a subclass of BatchNormalization whose call may "
            "differ from the BN it would be folded as"
        )
    return None


def bn_not_training(site):
    if _keras_compat.node_keyword_arguments(site.bn_node).get("training") is True:
        return (
            "it is called with training=True in the graph, so it normalizes with batch "
            "statistics, which no fixed kernel can reproduce"
        )
    return None


def bn_called_once(site):
    calls = site.calls[id(site.bn)]
    if calls != 1:
        return f"the BN layer is called {calls} times (shared); its other calls need it unchanged"
    return None


def bn_single_axis(site):
    if len(site.bn_axes) != 1:
        return (
            f"it normalizes several axes (axis={site.bn.axis!r}), so there is no single channel "
            "axis to fold into a kernel"
        )
    return None


def bn_finite(site):
    values = statistics(site.bn)
    bad = [n for n, v in values.items() if v is not None and not np.isfinite(v).all()]
    if bad:
        return f"its {', '.join(bad)} contain NaN or infinity"
    if not (values["moving_variance"] + site.bn.epsilon > 0).all():
        return "moving_variance + epsilon is not positive for some channel"
    return None


# --- 6–11 and 14–18: the neighbour -------------------------------------------------------------


def bn_activation(bn):
    """The BN's activation function, linear for Keras's BN (which has none)."""
    return getattr(bn, "activation", keras.activations.linear)


def _nonlinear_activation_name(layer):
    """The name of `layer`'s activation, or None when it has none or a linear one."""
    activation = getattr(layer, "activation", keras.activations.linear)
    if activation is keras.activations.linear:
        return None
    return getattr(activation, "__name__", repr(activation))


def bn_linear_activation(site):
    name = _nonlinear_activation_name(site.bn)
    if name:
        return (
            f"it applies the activation '{name}' after normalizing, and a multiply-add cannot "
            "be moved forward through a nonlinearity"
        )
    return None


def linear_activation(site):
    name = _nonlinear_activation_name(site.layer)
    if name:
        return (
            f"'{site.layer.name}' applies the activation '{name}' before the BN, and a "
            "nonlinearity cannot be moved through"
        )
    return None


def plain_kernel(site):
    layer = site.layer
    if getattr(layer, "lora_enabled", False):
        return f"'{layer.name}' has LoRA enabled; merge it into the kernel first"
    mode = getattr(layer, "quantization_mode", None)
    if mode is not None:
        return f"'{layer.name}' is quantized ({mode}), and a folded kernel would need requantizing"
    return None


def neighbour_called_once(site):
    calls = site.calls[id(site.layer)]
    if calls != 1:
        return (
            f"'{site.layer.name}' is called {calls} times (a shared layer); its other calls "
            "need its weights unchanged"
        )
    return None


def producer_feeds_only_bn(site):
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


def producer_channel_axis(site):
    rank = len(site.node.outputs[0].shape)
    axis = channel_axis(site.layer, rank)
    if site.bn_axes != (axis,):
        return (
            f"the BN normalizes axis {site.bn_axes[0]}, but '{site.layer.name}' keeps its "
            f"channels on axis {axis}"
        )
    return None


@functools.cache
def keras_misplaces_channels_first_bias():
    """Whether this Keras adds a (1, C, 1, …) bias on the LAST axis of x when that axis also has
    C positions. Keras 3's TensorFlow `ops.add` takes such a y for a bias and calls
    `tf.nn.bias_add` with NHWC whenever x's last axis matches (3.15 does); every conv layer adds
    its channels_first bias through it."""
    x = keras.ops.zeros((1, 2, 2))
    bias = keras.ops.reshape(keras.ops.arange(2.0), (1, 2, 1))
    return not np.array_equal(keras.ops.convert_to_numpy(keras.ops.add(x, bias))[0, :, 0], [0, 1])


def misplaced_bias(layer, output_shape):
    """Why a bias given to `layer` would not land on its channels, or None (checks 11 and 18).

    A bias changed by a fold then differs per position along the last axis instead of per
    channel. The last axis's size is a risk when unknown (an eager call may bring C)."""
    if getattr(layer, "data_format", None) != "channels_first":
        return None
    channels, last = output_shape[1], output_shape[-1]
    if last not in (None, channels) or not keras_misplaces_channels_first_bias():
        return None
    size = "an unknown number of" if last is None else f"{last}"
    return (
        f"'{layer.name}' is channels_first and its output's last axis has {size} positions, "
        f"where it has {channels} channels: this Keras (keras.ops.add → tf.nn.bias_add NHWC) then "
        "adds its bias on the last axis, so a folded bias would land on the wrong axis"
    )


def bias_on_channels(site):
    return misplaced_bias(site.layer, site.node.outputs[0].shape)


def consumer_is_foldable(site):
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


def consumer_channel_axis(site):
    axis = channel_axis(site.layer, len(site.bn_output.shape))
    if site.bn_axes != (axis,):
        return (
            f"the BN normalizes axis {site.bn_axes[0]}, but '{site.layer.name}' after it reads "
            f"its channels on axis {axis}"
        )
    return None


def bn_feeds_only_consumer(site):
    if site.layer is not None and site.graph.feeds_only(site.bn_output, site.node):
        return None
    readers = site.graph.readers[id(site.bn_output)]
    if id(site.bn_output) in site.graph.outputs:
        return "its output is a model output"
    names = ", ".join(n.operation.name for n in readers)
    return f"its output feeds {len(readers)} layers ({names})"


def folded_weights_finite(layer, kernel, bias):
    """Checks 12 and 19, on the weights a fold computed for `layer`."""
    if not (np.isfinite(kernel).all() and np.isfinite(bias).all()):
        return (
            f"the folded weights of '{layer.name}' overflow {kernel.dtype} (the BN "
            "scale γ/√(variance+ε) is too large)"
        )
    return None


def no_producer(producer):
    if producer is None:
        return "it reads a model input, with no layer before it to fold into"
    if _keras_compat.is_graph_model(producer):
        return (
            f"'{producer.name}' before it is a nested model, and folds do not cross model "
            "boundaries"
        )
    return f"'{producer.name}' before it ({type(producer).__name__}) has no kernel to fold into"


BN_CHECKS = (bn_is_exact_class, bn_not_training, bn_called_once, bn_single_axis, bn_finite)
PRODUCER_CHECKS = (
    linear_activation,
    plain_kernel,
    neighbour_called_once,
    producer_feeds_only_bn,
    producer_channel_axis,
    bias_on_channels,
)
CONSUMER_CHECKS = (
    bn_linear_activation,
    bn_feeds_only_consumer,
    consumer_is_foldable,
    plain_kernel,
    neighbour_called_once,
    consumer_channel_axis,
    bias_on_channels,
)
# The numbered list of the module docstring, 1 to 20.
PRECONDITIONS = (
    *BN_CHECKS,
    *PRODUCER_CHECKS,
    folded_weights_finite,
    *CONSUMER_CHECKS,
    folded_weights_finite,
)
