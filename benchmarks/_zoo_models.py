"""The keras.applications zoo as the benchmark and the tests build it, and how to read its exports.

Shared by `benchmarks/zoo.py` (every architecture) and `tests/test_zoo.py` (one per family), so
both measure the same models:

  * `architectures()`: every model constructor `keras.applications` of the installed Keras
    exports, found by inspecting the module (a new Keras adds rows by itself);
  * `family(name)`: the architecture's family, from the module that defines it;
  * `construct(name)`: the model with `weights=None` and logits out, at the smallest square
    input it accepts;
  * `build(name)`: that model with every BatchNormalization given statistics and γ/β that are
    non-trivial yet keep activations in range (see `build`);
  * `bn_arithmetic(proto, model)`: which ONNX nodes still compute a BN layer's affine map.

Nothing here prints or touches the process's streams: the programs that use it do that.
"""

from __future__ import annotations

import collections
import re
import sys

import keras
import numpy as np

import kerasbn
from kerasbn import _keras_compat

# The smallest member (fewest parameters, measured with Keras 3.15 at each minimum size) of each
# family: what CI and `zoo.py --quick` run. A family this table does not know (a new Keras)
# falls back to its first member by name, so it is still covered.
SMALLEST = {
    "convnext": "ConvNeXtTiny",
    "densenet": "DenseNet121",
    "efficientnet": "EfficientNetB0",
    "efficientnet_v2": "EfficientNetV2B0",
    "inception_resnet_v2": "InceptionResNetV2",
    "inception_v3": "InceptionV3",
    "mobilenet": "MobileNet",
    "mobilenet_v2": "MobileNetV2",
    "mobilenet_v3": "MobileNetV3Small",
    "nasnet": "NASNetMobile",
    "resnet": "ResNet50",
    "resnet_v2": "ResNet50V2",
    "vgg": "VGG16",
    "xception": "Xception",
}

# Statistics: from one population pass over random images, enough of them that every BN sees
# STATISTICS_VALUES values per channel (images × the fewest spatial positions any BN of the
# model sees), at least STATISTICS_IMAGES; then moved by PERTURBATION (the mean by that many
# standard deviations), with γ and β compensating the move (see `build`).
PERTURBATION = 0.05
STATISTICS_IMAGES = 64
STATISTICS_VALUES = 1024
_LARGEST_SIDE = 600  # no keras.applications model needs more (EfficientNetB7 is made for 600)


def architectures() -> dict[str, object]:
    """Every model constructor of `keras.applications`, by name (sorted)."""
    found = {}
    for name in dir(keras.applications):
        constructor = getattr(keras.applications, name)
        module = getattr(constructor, "__module__", "") or ""
        # Constructors are the capitalized functions defined in an applications module;
        # the lower-case attributes are those modules themselves (and their preprocess_input).
        if name[:1].isupper() and callable(constructor) and ".applications." in module:
            found[name] = constructor
    return dict(sorted(found.items()))


def family(name: str) -> str:
    """The architecture's family: its defining module, less a trailing depth ("vgg16" → "vgg")."""
    module = architectures()[name].__module__.rsplit(".", 1)[-1]
    # Two or more digits right after a letter are a depth (vgg16, vgg19); "mobilenet_v2",
    # "inception_v3" and "resnet_v2" are versions, families of their own.
    return re.sub(r"(?<=[a-z])\d{2,}$", "", module)


def families() -> dict[str, list[str]]:
    """Family → its architectures, both sorted."""
    grouped = collections.defaultdict(list)
    for name in architectures():
        grouped[family(name)].append(name)
    return dict(sorted(grouped.items()))


def smallest_per_family() -> dict[str, str]:
    """Family → the architecture CI runs for it (see `SMALLEST`)."""
    return {
        group: SMALLEST[group] if SMALLEST.get(group) in members else members[0]
        for group, members in families().items()
    }


def construct(name: str, *, at_least: int = 1):
    """`name` with `weights=None` and logits out, at the smallest square input ≥ `at_least` it
    accepts: (model, side).

    The constructors refuse small inputs before building anything (InceptionV3 wants 75,
    Xception 71, most 32), so trying every side upward costs one build.
    """
    constructor = architectures()[name]
    for size in range(at_least, max(at_least, _LARGEST_SIDE) + 1):
        try:
            model = constructor(
                weights=None, input_shape=(size, size, 3), classifier_activation=None
            )
        except ValueError:
            continue
        return model, size
    raise ValueError(
        f"{name} accepts no square input from {at_least} to {_LARGEST_SIDE}. "
        f"Received: at_least={at_least}"
    )


def preprocess(name: str, images: np.ndarray) -> np.ndarray:
    """`images` (pixels 0–255) as the architecture's own `preprocess_input` prepares them."""
    module = sys.modules[architectures()[name].__module__]
    return np.asarray(module.preprocess_input(images.copy()), dtype="float32")


def random_images(name: str, size: int, count: int, seed: int = 0) -> np.ndarray:
    """`count` random pixel images (0–255), preprocessed for `name`.

    Each image is a random colour, plus a random 4×4 pattern scaled up, plus pixel noise.
    Uniform noise alone would not do: a deep feature averages many pixels, so across images of
    pure noise it is nearly constant, a BN then divides by √(var + ε) with var ≪ ε, and its
    output on other images is large (EfficientNetB0's logits reached 1e2). Images that differ
    as wholes keep deep features varying, as real photographs do.
    """
    rng = np.random.default_rng(seed)
    colour = rng.uniform(0.0, 255.0, (count, 1, 1, 3))
    pattern = rng.uniform(-64.0, 64.0, (count, 4, 4, 3))
    repeats = -(-size // 4)
    pattern = np.repeat(np.repeat(pattern, repeats, axis=1), repeats, axis=2)[:, :size, :size]
    noise = rng.uniform(-32.0, 32.0, (count, size, size, 3))
    pixels = np.clip(colour + pattern + noise, 0.0, 255.0).astype("float32")
    return preprocess(name, pixels)


def batch_norm_layers(model) -> list:
    """Every BatchNormalization layer (Keras's or kerasbn's) of `model`, nested ones included."""
    kinds = (keras.layers.BatchNormalization, kerasbn.BatchNormalization)
    return [layer for layer in _keras_compat.sublayers(model) if isinstance(layer, kinds)]


def positions(layer) -> int:
    """Values per channel a BN layer sees per sample (its input's spatial positions; 1 for a
    dense feature)."""
    return int(np.prod(layer.input.shape[1:]) // np.prod(layer.moving_mean.shape))


def statistics_image_count(layers) -> int:
    """How many images `build` draws the statistics of these BN layers from (see `build`)."""
    fewest = min(positions(layer) for layer in layers)
    return max(STATISTICS_IMAGES, -(-STATISTICS_VALUES // fewest))


def build(name: str, *, at_least: int = 1, seed: int = 0):
    """(model, side): `construct(name, at_least=at_least)` with non-trivial BN parameters.

    Per BN layer, γ = ±U(0.8, 1.2) (both signs: a negative scale is a case folding must get
    right) and β ~ N(0, 0.1); mean and variance from one `kerasbn.population_statistics` pass
    over random preprocessed images, all in one batch; then both statistics moved, with γ and β
    compensating the move. Every BN then computes exactly the standardization of that pass
    followed by its own γ and β (activations in range), while none of its four parameters is a
    trivial value or its input's moment. Each choice was measured (float32 against the same
    model in float64, on 4 other images, at 32×32; EfficientNetB6's figures unless named):

      * statistics drawn at random let activations grow through hundreds of layers
        (EfficientNetV2L's logits reached 1e7): what is tested is then float32 rounding, not
        the export.
      * One batch, so that inference reproduces the pass: with several, a deep BN's estimate is
        of inputs normalized per batch, not with the final statistics (EfficientNetB0's last BN
        output reached 1e2).
      * Enough images that every BN sees STATISTICS_VALUES (1024) values per channel: at 32×32
        the deepest feature maps are 1×1, so a deep BN sees one value per image. From 64, the
        statistics fit those images only: new images land up to 200 standard deviations from
        the last BN's mean, the logits reach 76 and float32 is 0.10 from float64, 13× the
        default verify tolerance (atol 1e-5 + rtol 1e-4 × the largest |logit|). From 256,
        0.32× the tolerance; 512, 0.04×; 1024, 0.04× (EfficientNetB7: 0.20× at 512, 0.09× at
        1024; EfficientNetV2B3: 1.06× at 64, 0.07× at 512).
      * The move (the mean by N(0, 1)·PERTURBATION standard deviations, the variance by a factor
        1 + U(−1, 1)·PERTURBATION) is compensated: γ′ = γ·√(var′ + ε)/√(var + ε) and
        β′ = β + γ′·(mean′ − mean)/√(var′ + ε), so γ′(x − mean′)/√(var′ + ε) + β′ is the
        pass's γ(x − mean)/√(var + ε) + β. Uncompensated, each BN's output departs from what
        the next BN's statistics were measured on, and the departures compound with depth:
        with 512 images, the statistics images themselves reach 185 standard deviations at the
        last BN in inference (13 compensated) and float32's error doubles (0.10× the tolerance
        against 0.04×). A layer without γ (`scale=False`, as in InceptionV3) keeps its variance
        unmoved, one without β its mean, since nothing could compensate them.
      * Deep features barely vary across images of uniform noise (see `random_images`).

    Not the cause, measured: a BN's |mean| ≫ std (catastrophic cancellation in x − mean). At
    every BN of EfficientNetB6 built from 64 images, |mean|/√(var + ε) ≤ 1.5.

    Not fixed by this: ResNet50/101/152 at 32×32, where float32's relative error grows steadily,
    about 1.35× per residual block (ResNet50: 5e-7 after the first BN, 6e-5 at the logits), with
    activations in range (|x| ≤ 11 at every layer); over 32 images ResNet50's error is
    0.46× the tolerance at the median, 0.68× at most, as with 64 uncompensated images (0.46×,
    0.78×). Damping the γ of the BNs that end a residual branch (×0.3) did not change it.
    """
    keras.utils.set_random_seed(seed)
    model, size = construct(name, at_least=at_least)
    layers = batch_norm_layers(model)
    if not layers:
        return model, size
    rng = np.random.default_rng(seed)
    for layer in layers:
        shape = tuple(layer.moving_mean.shape)
        if layer.scale:
            sign = rng.choice([-1.0, 1.0], shape)
            layer.gamma.assign(sign * rng.uniform(0.8, 1.2, shape))
        if layer.center:
            layer.beta.assign(rng.normal(0.0, 0.1, shape))
    images = random_images(name, size, statistics_image_count(layers), seed)
    # One batch holding every image: the pass normalizes each BN with that batch's moments,
    # which inference then reproduces exactly once the variance is made biased again (below).
    kerasbn.population_statistics(model, images, batch_size=len(images), verbose=0)
    for layer in layers:
        shape = tuple(layer.moving_mean.shape)
        count = len(images) * positions(layer)
        mean = np.asarray(layer.moving_mean, dtype="float64")
        variance = np.asarray(layer.moving_variance, dtype="float64") * (count - 1) / count
        std = np.sqrt(variance + layer.epsilon)
        moved_mean = mean + PERTURBATION * std * rng.standard_normal(shape)
        moved_variance = variance * (1.0 + PERTURBATION * rng.uniform(-1.0, 1.0, shape))
        _move_statistics(layer, mean, variance, moved_mean, moved_variance)
    return model, size


def _move_statistics(layer, mean, variance, moved_mean, moved_variance):
    """Sets the layer's statistics to the moved ones where γ and β can keep its output as it
    was (see `build`): the variance only with γ (`scale`), the mean only with β (`center`)."""
    if not layer.scale:
        moved_variance = variance
    if not layer.center:
        moved_mean = mean
    std = np.sqrt(variance + layer.epsilon)
    moved_std = np.sqrt(moved_variance + layer.epsilon)
    gamma = np.asarray(layer.gamma, dtype="float64") * moved_std / std if layer.scale else 1.0
    if layer.scale:
        layer.gamma.assign(gamma)
    if layer.center:
        beta = np.asarray(layer.beta, dtype="float64")
        layer.beta.assign(beta + gamma * (moved_mean - mean) / moved_std)
    layer.moving_mean.assign(moved_mean)
    layer.moving_variance.assign(moved_variance)


BN_ARITHMETIC_OPS = ("Mul", "Add", "Sub")


def bn_arithmetic(proto, model, bn_names=None) -> collections.Counter:
    """BN layer name → the ONNX Mul/Add/Sub nodes of `proto` that belong to that layer.

    tf2onnx names a node after the TensorFlow op it came from, whose name is the path of Keras
    name scopes: ".../<model>/<layer>/batchnorm/mul_1". A node belongs to a BN layer when one
    component of its name is the layer's name, or the name with TensorFlow's "_N" suffix for a
    reused scope ("conv1_bn_1") provided no other layer of the model has that name. Only the
    names in `bn_names` (default: every BN layer of `model`) are counted. Arithmetic tf2onnx
    merged into a Conv is gone from the graph, so it is not counted: this is what is left.
    """
    bn = {layer.name for layer in batch_norm_layers(model)}
    wanted = bn if bn_names is None else set(bn_names)
    others = {model.name, *(layer.name for layer in _keras_compat.sublayers(model))} - bn

    def owner(component):
        if component in bn:
            return component
        if component in others:
            return None
        stem = re.sub(r"_\d+$", "", component)
        return stem if stem in bn else None

    counts = collections.Counter()
    for node in proto.graph.node:
        if node.op_type not in BN_ARITHMETIC_OPS:
            continue
        for component in node.name.split("/"):
            layer = owner(component)
            if layer is not None:
                if layer in wanted:
                    counts[layer] += 1
                break
    return counts


def op_count(proto, op_type: str) -> int:
    return sum(node.op_type == op_type for node in proto.graph.node)
