"""fold_batchnorm on Keras models: numbers (folded vs original in inference) and structure.

Every test compares the folded model with the original on random inputs, to 1e-5 relative to
the output's size in float32 (`assert_agree`), and checks what the report and the new model
say about each BN. Preconditions are one grid, `REFUSALS`, one row per reason.
"""

import re

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn import _keras_compat
from kerasbn.export import FoldRecord, FoldReport, fold_batchnorm, preconditions, rewrite
from tests.helpers import Subclassed, all_layers, bn_layers, keras_batch_normalization, randomize_bn

L = keras.layers



# --- shared helpers ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_session():
    """Layer names restart in every test: reasons quote them. (Without the full gc.collect,
    which takes half a second per test here.)"""
    keras.backend.clear_session(free_memory=False)


def sample_inputs(model, rng, batch=2):
    # A top-level Sequential has `inputs` but, never called, no `input`.
    structure = model.inputs[0] if isinstance(model, keras.Sequential) else model.input
    return keras.tree.map_structure(
        lambda t: rng.standard_normal((batch, *t.shape[1:])).astype("float32"), structure
    )


def assert_agree(original, folded, inputs):
    """Inference outputs agree to 1e-5 relative, in float32, per output.

    Relative to the output's largest value: an element that is ~0 after cancellation has no
    meaningful relative error of its own.
    """
    expected = keras.tree.flatten(original(inputs, training=False))
    actual = keras.tree.flatten(folded(inputs, training=False))
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        e = keras.ops.convert_to_numpy(e)
        finite = np.abs(e[np.isfinite(e)])
        scale = finite.max() if finite.size else 0.0
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a), e, rtol=1e-5, atol=1e-5 * scale
        )


def fold_and_compare(model, rng, randomize=True):
    if randomize:
        randomize_bn(model, rng)
    folded, report = fold_batchnorm(model)
    assert_agree(model, folded, sample_inputs(model, rng))
    return folded, report


def actions(report):
    return [(r.bn, r.producer, r.action) for r in report.records]


def functional(inputs, outputs):
    return keras.Model(inputs, outputs)


# --- one test per producer kind and layout ------------------------------------------------------

PRODUCERS = {
    "dense": ((6,), lambda: L.Dense(5), -1),
    "dense_rank3_no_bias": ((4, 6), lambda: L.Dense(5, use_bias=False), -1),
    "conv1d_causal_dilated": (
        (12, 3),
        lambda: L.Conv1D(4, 3, padding="causal", dilation_rate=2),
        -1,
    ),
    "conv1d_channels_first": ((3, 12), lambda: L.Conv1D(4, 3, data_format="channels_first"), 1),
    "conv2d_strided_same_no_bias": (
        (9, 9, 3),
        lambda: L.Conv2D(4, 3, strides=2, padding="same", use_bias=False),
        -1,
    ),
    "conv2d_groups": ((8, 8, 4), lambda: L.Conv2D(6, 3, groups=2), -1),
    "conv2d_channels_first": (
        (3, 9, 9),
        lambda: L.Conv2D(4, 3, dilation_rate=2, data_format="channels_first"),
        1,
    ),
    "conv3d": ((5, 5, 5, 2), lambda: L.Conv3D(3, 2, strides=(1, 2, 1)), -1),
    "conv3d_channels_first": (
        (2, 5, 5, 5),
        lambda: L.Conv3D(3, 2, data_format="channels_first"),
        1,
    ),
    "depthwise1d_multiplier3": ((10, 3), lambda: L.DepthwiseConv1D(3, depth_multiplier=3), -1),
    "depthwise2d_no_bias": (
        (8, 8, 3),
        lambda: L.DepthwiseConv2D(3, depth_multiplier=2, strides=2, use_bias=False),
        -1,
    ),
    "depthwise2d_channels_first": (
        (3, 9, 9),
        lambda: L.DepthwiseConv2D(3, depth_multiplier=2, data_format="channels_first"),
        1,
    ),
    "conv1d_transpose": ((6, 3), lambda: L.Conv1DTranspose(4, 3, strides=2), -1),
    "conv2d_transpose_channels_first": (
        (3, 5, 5),
        lambda: L.Conv2DTranspose(4, 3, padding="same", data_format="channels_first"),
        1,
    ),
    "conv3d_transpose_no_bias": (
        (3, 3, 3, 2),
        lambda: L.Conv3DTranspose(3, 2, strides=2, use_bias=False),
        -1,
    ),
    "separable1d": ((10, 3), lambda: L.SeparableConv1D(4, 3, depth_multiplier=2), -1),
    "separable2d_no_bias": ((8, 8, 3), lambda: L.SeparableConv2D(5, 3, use_bias=False), -1),
    "separable2d_channels_first": (
        (3, 8, 8),
        lambda: L.SeparableConv2D(5, 3, data_format="channels_first"),
        1,
    ),
}


@pytest.mark.parametrize("case", PRODUCERS.values(), ids=PRODUCERS.keys())
def test_folds_into_each_producer_layout(case, rng):
    shape, make_producer, axis = case
    inputs = keras.Input(shape)
    producer, bn = make_producer(), kerasbn.BatchNormalization(axis=axis)
    model = functional(inputs, L.ReLU()(bn(producer(inputs))))

    folded, report = fold_and_compare(model, rng)

    assert actions(report) == [(bn.name, producer.name, "folded")]
    assert bn_layers(folded) == []
    new_producer = folded.get_layer(producer.name)
    assert new_producer.use_bias and new_producer is not producer
    assert len(folded.layers) == len(model.layers) - 1


BN_VARIANTS = {
    "keras": lambda: L.BatchNormalization(),
    "keras_renorm": lambda: keras_batch_normalization(renorm=True),
    "keras_synchronized": lambda: L.BatchNormalization(synchronized=True),
    "keras_no_scale_no_center": lambda: L.BatchNormalization(scale=False, center=False),
    "kerasbn_population": lambda: kerasbn.BatchNormalization(statistics="population"),
    "kerasbn_synchronized_eps": lambda: kerasbn.BatchNormalization(synchronized=True, epsilon=0.1),
    "kerasbn_axis_tuple_of_one": lambda: kerasbn.BatchNormalization(axis=(-1,)),
    "kerasbn_renorm": lambda: kerasbn.BatchNormalization(
        renorm=True, renorm_clipping={"rmax": 3.0, "dmax": 5.0}, renorm_warmup_steps=10
    ),
    "kerasbn_ghost_batches": lambda: kerasbn.BatchNormalization(virtual_batch_size=2),
}


@pytest.mark.parametrize("make_bn", BN_VARIANTS.values(), ids=BN_VARIANTS.keys())
def test_folds_every_bn_variant(make_bn, rng):
    inputs = keras.Input((7, 7, 3))
    bn = make_bn()
    model = functional(inputs, bn(L.Conv2D(4, 3, use_bias=False)(inputs)))

    folded, report = fold_and_compare(model, rng)

    assert [r.action for r in report.records] == ["folded"]
    assert bn_layers(folded) == []


# --- a BN with an activation -----------------------------------------------------------------

BN_ACTIVATION_PRODUCERS = {
    "conv2d_relu": ((7, 7, 3), lambda: L.Conv2D(4, 3, use_bias=False), "relu", -1),
    "dense_silu": ((6,), lambda: L.Dense(5), "swish", -1),
    "depthwise_relu6": ((8, 8, 3), lambda: L.DepthwiseConv2D(3), "relu6", -1),
    "conv_channels_first_hard_silu": (
        (3, 9, 9), lambda: L.Conv2D(4, 3, data_format="channels_first"), "hard_swish", 1,
    ),
    "separable_sigmoid": ((8, 8, 3), lambda: L.SeparableConv2D(5, 3), "sigmoid", -1),
    "conv_gelu_not_fused": ((7, 7, 3), lambda: L.Conv2D(4, 3), "gelu", -1),
}


@pytest.mark.parametrize("case", BN_ACTIVATION_PRODUCERS.values(),
                         ids=BN_ACTIVATION_PRODUCERS.keys())
def test_bn_activation_moves_onto_the_producer(case, rng):
    """conv → BN(relu) becomes conv(relu): the producer had none, and now applies the BN's."""
    shape, make_producer, activation, axis = case
    inputs = keras.Input(shape)
    producer = make_producer()
    bn = kerasbn.BatchNormalization(axis=axis, activation=activation)
    model = functional(inputs, L.Dense(2)(L.Flatten()(bn(producer(inputs)))))

    folded, report = fold_and_compare(model, rng)

    assert actions(report) == [(bn.name, producer.name, "folded")]
    assert bn_layers(folded) == []
    assert folded.get_layer(producer.name).activation is keras.activations.get(activation)
    assert producer.activation is keras.activations.linear  # the original is untouched


def test_bn_activation_is_kept_with_a_kept_bn(rng):
    """A BN that cannot fold stays with its activation (outputs compared by fold_and_compare)."""
    inputs = keras.Input((6, 6, 3))
    bn = kerasbn.BatchNormalization(activation="relu")
    model = functional(inputs, L.Flatten()(bn(L.Add()([inputs, inputs]))))

    folded, report = fold_and_compare(model, rng)

    assert [r.action for r in report.records] == ["kept"]
    (kept,) = bn_layers(folded)
    assert kept.activation is keras.activations.relu


def test_bn_activation_refused_backward_is_not_folded_forward(rng):
    """The producer has an activation of its own: neither side can take the BN's."""
    inputs = keras.Input((6,))
    dense, bn = L.Dense(5, activation="tanh"), kerasbn.BatchNormalization(activation="relu")
    model = functional(inputs, L.Dense(3)(bn(dense(inputs))))

    folded, report = fold_and_compare(model, rng)

    (record,) = report.records
    assert record.action == "refused"
    assert "applies the activation 'tanh'" in record.reason
    assert "it applies the activation 'relu' after normalizing" in record.reason


# --- forward folds ----------------------------------------------------------------------------


def _add_of_two_convs(inputs, filters, **conv_args):
    """An Add of two convs: a tensor with no single producer, as in ResNetV2 / DenseNet."""
    left = L.Conv2D(filters, 1, **conv_args)(inputs)
    right = L.Conv2D(filters, 1, use_bias=False, **conv_args)(inputs)
    return L.Add()([left, right])


FORWARD = {
    "dense_after_add": (
        (6,),
        lambda x: L.Add()([L.Dense(4)(x), L.Dense(4)(x)]),
        lambda: L.Dense(3),
        -1,
    ),
    "conv2d_grouped_strided_after_concat": (
        (9, 9, 3),
        lambda x: L.Concatenate()([L.Conv2D(2, 1)(x), L.Conv2D(2, 1)(x)]),
        lambda: L.Conv2D(6, 3, strides=2, groups=2),
        -1,
    ),
    "conv2d_channels_first_dilated": (
        (3, 9, 9),
        lambda x: _add_of_two_convs(x, 4, data_format="channels_first"),
        lambda: L.Conv2D(6, 3, dilation_rate=2, data_format="channels_first", use_bias=False),
        1,
    ),
    "conv1d": ((10, 3), lambda x: L.Add()([x, x]), lambda: L.Conv1D(4, 3), -1),
    "conv3d": ((5, 5, 5, 2), lambda x: L.Add()([x, x]), lambda: L.Conv3D(3, 2), -1),
    "dense_after_model_input": ((6,), lambda x: x, lambda: L.Dense(3), -1),
    "dense_after_refused_relu_producer": (
        (6,),
        lambda x: L.Dense(4, activation="relu")(x),
        lambda: L.Dense(3),
        -1,
    ),
}


@pytest.mark.parametrize("case", FORWARD.values(), ids=FORWARD.keys())
def test_folds_forward_into_the_next_dense_or_valid_conv(case, rng):
    shape, make_input, make_consumer, axis = case
    inputs = keras.Input(shape)
    bn, consumer = kerasbn.BatchNormalization(axis=axis), make_consumer()
    model = functional(inputs, consumer(bn(make_input(inputs))))

    folded, report = fold_and_compare(model, rng)

    assert actions(report) == [(bn.name, consumer.name, "folded_forward")]
    assert bn_layers(folded) == []


def test_a_layer_takes_a_fold_from_each_side(rng):
    inputs = keras.Input((8, 8, 3))
    before, conv, after = L.BatchNormalization(), L.Conv2D(4, 3), L.BatchNormalization()
    model = functional(inputs, L.ReLU()(after(conv(before(L.Add()([inputs, inputs]))))))

    folded, report = fold_and_compare(model, rng)

    assert actions(report) == [
        (before.name, conv.name, "folded_forward"),
        (after.name, conv.name, "folded"),
    ]
    assert bn_layers(folded) == []


# --- preconditions: one row per refusal (or keep) reason -----------------------------------------


class SubclassedBN(kerasbn.BatchNormalization):
    pass


def _conv_bn(bn=None, conv=None, shape=(6, 6, 3), tail=L.ReLU):
    """Input → conv → BN → tail; returns (model, bn)."""
    inputs = keras.Input(shape)
    bn = bn or kerasbn.BatchNormalization()
    conv = conv or L.Conv2D(4, 3)
    return functional(inputs, tail()(bn(conv(inputs)))), bn


def _bn_after_add(bn=None, tail=L.ReLU, shape=(6, 6, 3)):
    """Input → Add → BN → tail: nothing to fold backward into."""
    inputs = keras.Input(shape)
    bn = bn or kerasbn.BatchNormalization()
    return functional(inputs, tail()(bn(L.Add()([inputs, inputs])))), bn


def _with_statistic(name, value, make=_conv_bn):
    def build():
        model, bn = make()
        randomize_bn(model, np.random.default_rng(1))
        values = keras.ops.convert_to_numpy(getattr(bn, name)).copy()
        values[0] = value
        getattr(bn, name).assign(values)
        return model, bn

    build.randomize = False
    return build


def _training_true():
    inputs = keras.Input((6, 6, 3))
    bn = kerasbn.BatchNormalization()
    return functional(inputs, bn(L.Conv2D(4, 3)(inputs), training=True)), bn


def _shared_bn():
    inputs = keras.Input((6, 6, 3))
    bn = kerasbn.BatchNormalization()
    return functional(inputs, L.Add()([bn(L.Conv2D(4, 3)(inputs)), bn(L.Conv2D(4, 3)(inputs))])), bn


def _several_axes():
    inputs = keras.Input((4, 6))
    bn = kerasbn.BatchNormalization(axis=(1, 2))
    return functional(inputs, bn(L.Dense(5)(inputs))), bn


def _dense_bn(dense, bn=None):
    inputs = keras.Input((6,))
    bn = bn or kerasbn.BatchNormalization()
    return functional(inputs, bn(dense(inputs))), bn


def _lora_dense():
    dense = L.Dense(5)
    model, bn = _dense_bn(dense)
    dense.enable_lora(2)
    return model, bn


def _quantized_dense():
    dense = L.Dense(5)
    model, bn = _dense_bn(dense)
    dense.quantize("int8")
    return model, bn


def _shared_producer():
    a, b = keras.Input((6,)), keras.Input((6,))
    dense, bn = L.Dense(5), kerasbn.BatchNormalization()
    return functional([a, b], L.Add()([bn(dense(a)), dense(b)])), bn


def _producer_feeds_another_layer():
    inputs = keras.Input((6, 6, 3))
    conv, bn = L.Conv2D(4, 3), kerasbn.BatchNormalization()
    x = conv(inputs)
    return functional(inputs, L.Add()([bn(x), L.ReLU()(x)])), bn


def _producer_output_is_model_output():
    inputs = keras.Input((6, 6, 3))
    conv, bn = L.Conv2D(4, 3), kerasbn.BatchNormalization()
    x = conv(inputs)
    return functional(inputs, [bn(x), x]), bn


def _huge_gamma(make):
    """γ near float32's maximum and variance 0: the statistics are finite, the fold is not."""

    def build():
        model, bn = make()
        bn.gamma.assign(np.full(bn.gamma.shape, 3e38, np.float32))
        bn.moving_variance.assign(np.zeros(bn.moving_variance.shape, np.float32))
        return model, bn

    build.randomize = False
    return build


def _bn_feeds_two_layers():
    inputs = keras.Input((6,))
    bn = kerasbn.BatchNormalization()
    y = bn(L.Add()([inputs, inputs]))
    return functional(inputs, [L.ReLU()(y), L.Dense(3)(y)]), bn


def _shared_consumer():
    a, b = keras.Input((6,)), keras.Input((6,))
    dense, bn = L.Dense(3), kerasbn.BatchNormalization()
    return functional([a, b], [dense(bn(L.Add()([a, a]))), dense(b)]), bn


def _lora_consumer():
    dense = L.Dense(3)
    model, bn = _bn_after_add(tail=lambda: dense, shape=(6,))
    dense.enable_lora(2)
    return model, bn


def _after_nested_model():
    block_input = keras.Input((6,))
    block = keras.Model(block_input, L.Dense(4)(block_input), name="block")
    inputs = keras.Input((6,))
    bn = kerasbn.BatchNormalization()
    return functional(inputs, L.ReLU()(bn(block(inputs)))), bn


REFUSALS = {
    # Keyed "<precondition>/<case>" (kerasbn.export.preconditions); 1–5: the BN itself
    "bn_is_exact_class/subclass": (
        lambda: _conv_bn(SubclassedBN()),
        "refused",
        "subclass of BatchNormalization",
    ),
    "bn_not_training/training_true": (_training_true, "refused", "training=True"),
    "bn_called_once/shared": (_shared_bn, "refused", "called 2 times (shared)"),
    "bn_single_axis/several_axes": (_several_axes, "refused", "several axes (axis=(1, 2))"),
    "bn_finite/nan_mean": (
        _with_statistic("moving_mean", np.nan),
        "refused",
        "moving_mean contain NaN",
    ),
    "bn_finite/inf_gamma": (
        _with_statistic("gamma", np.inf),
        "refused",
        "gamma contain NaN or infinity",
    ),
    "bn_finite/variance_below_minus_epsilon": (
        _with_statistic("moving_variance", -1.0),
        "refused",
        "moving_variance + epsilon is not positive",
    ),
    # 6–12: the producer
    "linear_activation/producer": (
        lambda: _dense_bn(L.Dense(5, activation="relu")),
        "refused",
        "applies the activation 'relu'",
    ),
    "plain_kernel/producer_lora": (_lora_dense, "refused", "has LoRA enabled"),
    "plain_kernel/producer_quantized": (_quantized_dense, "refused", "is quantized (int8)"),
    "neighbour_called_once/producer": (
        _shared_producer,
        "refused",
        "is called 2 times (a shared layer)",
    ),
    "producer_feeds_only_bn/another_layer": (
        _producer_feeds_another_layer,
        "refused",
        "also feeds re_lu",
    ),
    "producer_feeds_only_bn/model_output": (
        _producer_output_is_model_output,
        "refused",
        "also feeds the model output",
    ),
    "producer_channel_axis/channels_last": (
        lambda: _conv_bn(kerasbn.BatchNormalization(axis=1)),
        "refused",
        "normalizes axis 1, but 'conv2d' keeps its channels on axis 3",
    ),
    "producer_channel_axis/channels_first": (
        lambda: _conv_bn(L.BatchNormalization(), L.Conv2D(4, 3, data_format="channels_first")),
        "refused",
        "normalizes axis 3, but 'conv2d' keeps its channels on axis 1",
    ),
    "folded_weights_finite/producer": (_huge_gamma(_conv_bn), "refused", "overflow float32"),
    # no producer to fold into, and 13–20: the consumer
    "bn_linear_activation/relu_before_dense": (
        lambda: _bn_after_add(
            kerasbn.BatchNormalization(activation="relu"), lambda: L.Dense(3), (6,)
        ),
        "kept",
        "it applies the activation 'relu' after normalizing",
    ),
    "no_producer/model_input": (
        lambda: functional(*_input_bn_relu()),
        "kept",
        "reads a model input",
    ),
    "no_producer/nested_model": (
        _after_nested_model,
        "kept",
        "'block' before it is a nested model",
    ),
    "bn_feeds_only_consumer/model_output": (
        lambda: _bn_after_add(tail=lambda: (lambda x: x)),
        "kept",
        "its output is a model output",
    ),
    "bn_feeds_only_consumer/two_layers": (
        _bn_feeds_two_layers,
        "kept",
        "its output feeds 2 layers",
    ),
    "consumer_is_foldable/not_dense_or_conv": (
        _bn_after_add,
        "kept",
        "(ReLU) is not a Dense or a Conv",
    ),
    "consumer_is_foldable/padding_same": (
        lambda: _bn_after_add(tail=lambda: L.Conv2D(4, 3, padding="same")),
        "kept",
        "uses padding='same'",
    ),
    "plain_kernel/consumer_lora": (_lora_consumer, "kept", "has LoRA enabled"),
    "neighbour_called_once/consumer": (
        _shared_consumer,
        "kept",
        "is called 2 times (a shared layer)",
    ),
    "consumer_channel_axis/dense": (
        lambda: _bn_after_add(kerasbn.BatchNormalization(axis=1), lambda: L.Dense(3), (4, 6)),
        "kept",
        "normalizes axis 1, but 'dense' after it reads its channels on axis 2",
    ),
    "folded_weights_finite/consumer": (
        _huge_gamma(lambda: _bn_after_add(tail=lambda: L.Dense(3), shape=(6,))),
        "kept",
        "overflow float32",
    ),
    "linear_activation/and_no_forward": (
        lambda: _dense_bn(L.Dense(5, activation="relu")),
        "refused",
        "; and it cannot fold forward: its output is a model output",
    ),
}


def _input_bn_relu():
    inputs = keras.Input((6,))
    bn = kerasbn.BatchNormalization()
    return inputs, L.ReLU()(bn(inputs))


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_each_precondition_refuses_or_keeps_with_its_reason(case, rng):
    build, action, reason = case
    model, bn = _unpack_model(build())

    folded, report = fold_and_compare(model, rng, randomize=getattr(build, "randomize", True))

    (record,) = [r for r in report.records if r.bn == bn.name]
    assert record.action == action
    assert reason in record.reason
    assert len(bn_layers(folded)) == len(bn_layers(model))


def test_the_numbered_preconditions_the_code_and_the_refusal_cases_agree():
    # The module docstring's numbered list names each check, in the order the code runs them.
    listed = re.findall(r"^ {4}(\d+)\. `(\w+)`", preconditions.__doc__, flags=re.MULTILINE)
    assert listed == [
        (str(n), check.__name__) for n, check in enumerate(preconditions.PRECONDITIONS, 1)
    ]
    # Every check has a refusal case here (bias_on_channels has its own test below).
    tested = {key.split("/")[0] for key in REFUSALS} | {"bias_on_channels"}
    assert {check.__name__ for check in preconditions.PRECONDITIONS} <= tested


def _unpack_model(built):
    """Builders return (model, bn); the model-input case returns a model whose BN is found."""
    if isinstance(built, keras.Model):
        return built, bn_layers(built)[0]
    return built


def test_probe_matches_what_a_channels_first_conv_does():
    # The conv's own bias add, with bias c in channel c and a zero kernel, on an output whose
    # last axis has as many positions as channels.
    conv = L.Conv1D(3, 1, data_format="channels_first", kernel_initializer="zeros")
    conv.build((None, 2, 3))
    conv.bias.assign(np.arange(3.0, dtype="float32"))
    output = keras.ops.convert_to_numpy(conv(np.zeros((1, 2, 3), "float32")))[0]

    bias_on_last_axis = np.array_equal(output[0], [0.0, 1.0, 2.0])

    assert bias_on_last_axis == preconditions.keras_misplaces_channels_first_bias()


def _channels_first_hazard(spatial, forward):
    """A channels_first conv whose output's last axis has as many positions as channels (4),
    or an unknown number, before a BN (backward) or after one (forward)."""
    inputs = keras.Input((4, *spatial))
    bn = kerasbn.BatchNormalization(axis=1)
    conv = L.Conv2D(4, 3, data_format="channels_first")
    outputs = conv(bn(L.Add()([inputs, inputs]))) if forward else L.ReLU()(bn(conv(inputs)))
    return keras.Model(inputs, outputs), bn


@pytest.mark.parametrize("forward", [False, True], ids=["producer", "consumer"])
@pytest.mark.parametrize("spatial", [(6, 6), (None, None)], ids=["last_equals_channels", "unknown"])
def test_channels_first_bias_that_would_land_on_the_last_axis_is_refused(spatial, forward, rng):
    if not preconditions.keras_misplaces_channels_first_bias():
        pytest.skip("this Keras adds channels_first biases on the channel axis")
    model, bn = _channels_first_hazard(spatial, forward)
    randomize_bn(model, rng)

    folded, report = fold_batchnorm(model)

    (record,) = report.records
    assert record.action == ("kept" if forward else "refused")
    assert "its output's last axis has" in record.reason and "wrong axis" in record.reason
    assert_agree(model, folded, rng.standard_normal((2, 4, 6, 6)).astype("float32"))


# --- model kinds -------------------------------------------------------------------------------


def _dense_block_layers():
    return [L.Dense(8), kerasbn.BatchNormalization(), L.ReLU(), L.Dense(4, use_bias=False),
            L.BatchNormalization()]


@pytest.mark.parametrize("with_input", [True, False], ids=["input", "built"])
def test_sequential_stays_sequential(with_input, rng):
    layers = _dense_block_layers()
    if with_input:
        model = keras.Sequential([keras.Input((6,)), *layers])
    else:
        model = keras.Sequential(layers)
        model.build((None, 6))

    folded, report = fold_and_compare(model, rng)

    assert isinstance(folded, keras.Sequential)
    assert [r.action for r in report.records] == ["folded", "folded"]
    assert [type(layer) for layer in folded.layers] == [L.Dense, L.ReLU, L.Dense]


def _nested_model():
    """Outer Functional with a Sequential block called twice and a Functional block."""
    block = keras.Sequential(
        [keras.Input((8, 8, 4)), L.Conv2D(4, 3, padding="same", use_bias=False),
         kerasbn.BatchNormalization(), L.ReLU()],
        name="seq_block",
    )
    inner_input = keras.Input((8, 8, 4))
    inner = L.DepthwiseConv2D(3, padding="same")(inner_input)
    inner = L.BatchNormalization()(inner)
    fn_block = keras.Model(inner_input, L.ReLU()(inner), name="fn_block")
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 1)(inputs)
    x = kerasbn.BatchNormalization()(x)
    x = block(block(x))
    x = fn_block(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(2)(x), name="outer")


def test_raw_operations_in_the_graph_are_kept_and_reused(rng):
    inputs = keras.Input((6, 6, 3))
    x = L.BatchNormalization()(L.Conv2D(4, 3, use_bias=False)(inputs))
    x = keras.ops.multiply(x, 2.0)  # a raw operation: not a layer, no weights
    y = L.BatchNormalization()(L.Conv2D(4, 3, use_bias=False)(inputs))
    model = keras.Model(inputs, keras.ops.add(x, y))
    randomize_bn(model, rng)
    folded, report = fold_batchnorm(model)
    assert len(report.folded) == 2 and bn_layers(folded) == []
    raw = [op for op in folded.operations if not isinstance(op, L.Layer)]
    assert sorted(type(op).__name__ for op in raw) == ["Add", "Multiply"]
    assert_agree(model, folded, sample_inputs(model, rng))


def test_masking_model_folds_and_keeps_its_mask(rng):
    inputs = keras.Input((5, 3))
    x = L.Masking()(inputs)
    x = L.BatchNormalization()(L.Dense(4, use_bias=False)(x))
    model = keras.Model(inputs, L.LSTM(2)(x))
    randomize_bn(model, rng)
    folded, report = fold_batchnorm(model)
    assert len(report.folded) == 1
    x = rng.standard_normal((3, 5, 3)).astype("float32")
    x[0, 2:] = 0.0  # masked steps: the LSTM skips them only if the mask survived
    assert_agree(model, folded, x)


class _Scale(L.Layer):
    """y = x·factor, where `factor` is any object with `value`."""

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor.value


class _ScaleWithoutFactorInConfig(_Scale):
    """A config that omits a required argument: `from_config` cannot rebuild it."""

    def __init__(self, factor=None, **kwargs):
        if factor is None:
            raise TypeError("_ScaleWithoutFactorInConfig needs `factor`")
        super().__init__(factor, **kwargs)

    def get_config(self):
        return {"name": self.name}


class _Factor:
    value = 2.0


# Two ways a layer's config fails to round trip in every Keras: no config at all (an argument
# Keras cannot serialize, so `get_config` raises) and a config `from_config` rejects.
@pytest.mark.parametrize("layer_class", [_Scale, _ScaleWithoutFactorInConfig])
def test_a_layer_whose_config_does_not_round_trip_raises_a_clear_error(rng, layer_class):
    inputs = keras.Input((4,))
    x = L.BatchNormalization()(L.Dense(3, use_bias=False)(inputs))
    model = keras.Model(inputs, layer_class(_Factor(), name="doubling")(x))
    expected = f"Layer 'doubling' \\({layer_class.__name__}\\) cannot be rebuilt"
    with pytest.raises(TypeError, match=expected):
        fold_batchnorm(model)


def test_bn_called_inside_a_wrapper_is_reported_as_kept(rng):
    inputs = keras.Input((4, 6))
    x = L.TimeDistributed(L.BatchNormalization(name="inner_bn"), name="td")(inputs)
    model = keras.Model(inputs, L.BatchNormalization()(L.Dense(3, use_bias=False)(x)))
    randomize_bn(model, rng)
    folded, report = fold_batchnorm(model)
    assert [(r.bn, r.action) for r in report.records] == [
        ("td/inner_bn", "kept"), ("batch_normalization", "folded")
    ]
    assert "called inside 'td' (TimeDistributed)" in report.kept[0].reason
    assert_agree(model, folded, sample_inputs(model, rng))


def test_nested_models_are_folded_inside_and_keep_their_kind(rng):
    model = _nested_model()

    folded, report = fold_and_compare(model, rng)

    assert [(r.bn.split("/")[0], r.action) for r in report.records] == [
        (model.layers[2].name, "folded"),
        ("seq_block", "folded"),
        ("fn_block", "folded"),
    ]
    assert bn_layers(folded) == []
    assert isinstance(folded.get_layer("seq_block"), keras.Sequential)
    assert isinstance(folded.get_layer("fn_block"), keras.Model)
    # The block called twice is still one shared block in the folded model.
    assert sum(layer.name == "seq_block" for layer in folded.layers) == 1


def test_a_block_inside_two_sub_models_is_folded_once(rng):
    block = keras.Sequential(
        [keras.Input((6,)), L.Dense(6), kerasbn.BatchNormalization(name="block_bn")], name="block"
    )

    def wrapper(name):
        inputs = keras.Input((6,))
        return keras.Model(inputs, L.ReLU()(block(inputs)), name=name)

    inputs = keras.Input((6,))
    model = keras.Model(inputs, wrapper("second")(wrapper("first")(inputs)))

    folded, report = fold_and_compare(model, rng)

    assert actions(report) == [("first/block/block_bn", "dense", "folded")]
    assert bn_layers(folded) == []


def test_multi_input_multi_output_model(rng):
    a, b = keras.Input((6,), name="a"), keras.Input((5, 5, 2), name="b")
    left = L.ReLU()(kerasbn.BatchNormalization()(L.Dense(4)(a)))
    right = L.BatchNormalization()(L.Conv2D(3, 2)(b))
    model = keras.Model({"a": a, "b": b}, {"left": left, "right": right})

    folded, report = fold_and_compare(model, rng)

    assert len(report.folded) == 2 and bn_layers(folded) == []
    assert [t.name for t in keras.tree.flatten(folded.input)] == ["a", "b"]
    assert set(folded.output) == {"left", "right"}


# --- the original is never touched --------------------------------------------------------------


def _snapshot(model):
    return (
        [w.copy() for w in model.get_weights()],
        keras.saving.serialize_keras_object(model),
        {layer.name: len(_keras_compat.call_nodes(layer)) for layer in all_layers(model)},
    )


def test_original_model_is_never_mutated(rng):
    model = _nested_model()
    randomize_bn(model, rng)
    weights, config, nodes = _snapshot(model)

    folded, _ = fold_batchnorm(model)

    after_weights, after_config, after_nodes = _snapshot(model)
    assert after_config == config and after_nodes == nodes
    for before, after in zip(weights, after_weights, strict=True):
        np.testing.assert_array_equal(before, after)
    # The folded model owns its variables: changing them leaves the original as it was.
    for variable in folded.weights:
        variable.assign(np.zeros(variable.shape, variable.dtype))
    for before, after in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)


# --- bad input and broken invariants -------------------------------------------------------------


def test_refuses_what_is_not_a_keras_model():
    with pytest.raises(TypeError, match="Received: model='model.keras'"):
        fold_batchnorm("model.keras")
    with pytest.raises(TypeError, match="Received: model=<Dense"):
        fold_batchnorm(L.Dense(2))


def test_refuses_a_subclassed_model():
    model = Subclassed()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(TypeError, match="subclassed model.*Received: model=<Subclassed"):
        fold_batchnorm(model)


def test_refuses_an_unbuilt_sequential():
    model = keras.Sequential([L.Dense(2), L.BatchNormalization()], name="unbuilt")
    with pytest.raises(ValueError, match="not built.*Received: model=<Sequential name=unbuilt"):
        fold_batchnorm(model)


def test_a_rewrite_that_shares_variables_raises(monkeypatch):
    # A rebuild that reuses the original layers (a bug) must not pass silently.
    new_layer = rewrite._Rebuilder._new_layer

    def reuse(self, layer):
        keep = isinstance(layer, L.Dense)
        return layer if keep else new_layer(self, layer)

    monkeypatch.setattr(rewrite._Rebuilder, "_new_layer", reuse)
    model = keras.Sequential([keras.Input((3,)), L.Dense(2), kerasbn.BatchNormalization()])
    with pytest.raises(RuntimeError, match="shares 2 variables"):
        fold_batchnorm(model)


# --- the report --------------------------------------------------------------------------------


def test_report_counts_and_prints_every_record():
    report = FoldReport(
        [
            FoldRecord("bn_1", "conv", "folded"),
            FoldRecord("bn_2", "dense", "folded_forward"),
            FoldRecord("block/bn_3", "add", "kept", "no layer to fold into"),
            FoldRecord("bn_4", "conv_2", "refused", "'conv_2' applies the activation 'relu'"),
        ]
    )

    assert [r.bn for r in report.folded] == ["bn_1", "bn_2"]
    assert [r.bn for r in report.kept] == ["block/bn_3"]
    assert [r.bn for r in report.refused] == ["bn_4"]
    text = str(report)
    assert text.splitlines()[0] == (
        "4 BatchNormalization layers: 2 folded (1 forward), 1 refused, 1 kept"
    )
    for record in report.records:
        assert record.bn in text and record.action in text and record.reason in text


@pytest.mark.parametrize(
    "fields, message",
    [
        (("bn", "conv", "merged"), "Received: action='merged'"),
        (("bn", "conv", "folded", "why"), "reason='why'"),
        (("bn", None, "kept"), "reason=''"),
    ],
)
def test_records_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        FoldRecord(*fields)


# --- real architectures no one here wrote ---------------------------------------------------------


@pytest.mark.parametrize(
    "architecture, folded_count, kept_count",
    [
        (keras.applications.ResNet50, 53, 0),
        (keras.applications.MobileNetV2, 52, 0),
        # Pre-activation: each block's first BN follows an Add (or the stem's pooling) and
        # precedes a ReLU, so it has nothing to fold into either way.
        (keras.applications.ResNet50V2, 32, 17),
    ],
    ids=["ResNet50", "MobileNetV2", "ResNet50V2"],
)
def test_keras_applications(architecture, folded_count, kept_count, rng):
    model = architecture(weights=None, input_shape=(64, 64, 3), classifier_activation=None)

    folded, report = fold_and_compare(model, rng)

    assert (len(report.folded), len(report.kept), len(report.refused)) == (
        folded_count, kept_count, 0
    )
    assert len(bn_layers(folded)) == kept_count
    assert len(folded.layers) == len(model.layers) - folded_count


def _preactivation_model():
    """ResNetV2 and DenseNet in small: BN after an Add / a Concatenate, before a ReLU or a
    1×1 valid conv, besides the usual conv → BN."""
    inputs = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", name="stem")(inputs)
    for i in range(2):
        pre = L.ReLU()(L.BatchNormalization(name=f"preact_bn_{i}")(x))
        y = L.Conv2D(8, 1, use_bias=False, name=f"conv_{i}_1")(pre)
        y = L.ReLU()(L.BatchNormalization(name=f"bn_{i}_1")(y))
        y = L.Conv2D(8, 3, padding="same", name=f"conv_{i}_2")(y)
        x = L.Add(name=f"add_{i}")([x, y])
    dense = L.Concatenate()([x, L.Conv2D(4, 1, name="growth")(x)])
    x = L.BatchNormalization(name="transition_bn")(dense)
    x = L.Conv2D(6, 1, name="transition_conv")(x)
    x = L.ReLU()(L.BatchNormalization(name="post_bn")(L.Add(name="post_add")([x, x])))
    return keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x)))


def test_preactivation_pattern_folds_forward_or_keeps(rng):
    folded, report = fold_and_compare(_preactivation_model(), rng)

    assert {(r.bn, r.producer, r.action) for r in report.records} == {
        ("preact_bn_0", "stem", "refused"),
        ("bn_0_1", "conv_0_1", "folded"),
        ("preact_bn_1", "add_0", "kept"),
        ("bn_1_1", "conv_1_1", "folded"),
        ("transition_bn", "transition_conv", "folded_forward"),
        ("post_bn", "post_add", "kept"),
    }
    assert sorted(bn.name for bn in bn_layers(folded)) == ["post_bn", "preact_bn_0", "preact_bn_1"]
