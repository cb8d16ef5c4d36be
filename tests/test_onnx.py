"""to_onnx: numbers (ONNX Runtime vs the original Keras model) and structure (what is left).

The structural check for a fold: the folded export has exactly the ONNX operators of the same
model built without the BN (its producer given a random bias), so neither a BatchNormalization
node nor the Mul/Add that tf2onnx lowers an unfolded BN to is left. Real architectures
(ResNet50, MobileNetV2 and the smallest of every other `keras.applications` family) are
`tests/test_zoo.py`'s.
"""

import os

import keras
import numpy as np
import onnx
import onnxruntime
import pytest

import kerasbn
from kerasbn.export import ExportError, ExportReport, VerificationError, fold_batchnorm, to_onnx
from kerasbn.export import onnx as onnx_module
from kerasbn.export.convert import convert
from tests.helpers import (
    fold_counts,
    operators,
    randomize_biases,
    randomize_bn,
    run_onnx,
)

L = keras.layers


@pytest.fixture(autouse=True)
def _fresh_session():
    # Frees the graphs of earlier tests (ResNet50 is large) and restarts layer names.
    keras.backend.clear_session()


# --- one test per producer kind and layout -------------------------------------------------------

CF = {"data_format": "channels_first"}
# name: (input shape, producer class, its arguments, the BN axis)
PRODUCERS = {
    "dense": ((6,), L.Dense, {"units": 5}, -1),
    "conv1d": ((9, 3), L.Conv1D, {"filters": 4, "kernel_size": 3}, -1),
    "conv2d": ((8, 8, 3), L.Conv2D, {"filters": 4, "kernel_size": 3, "strides": 2,
                                     "padding": "same"}, -1),
    "conv2d_dilated": ((8, 8, 4), L.Conv2D, {"filters": 6, "kernel_size": 3,
                                             "dilation_rate": 2}, -1),
    "conv3d": ((5, 5, 5, 2), L.Conv3D, {"filters": 3, "kernel_size": 2}, -1),
    "conv1d_channels_first": ((3, 9), L.Conv1D, {"filters": 4, "kernel_size": 3, **CF}, 1),
    "conv2d_channels_first": ((3, 8, 8), L.Conv2D, {"filters": 4, "kernel_size": 3, **CF}, 1),
    "depthwise1d": ((9, 3), L.DepthwiseConv1D, {"kernel_size": 3, "depth_multiplier": 2}, -1),
    "depthwise2d": ((8, 8, 3), L.DepthwiseConv2D, {"kernel_size": 3, "depth_multiplier": 2}, -1),
    "conv1d_transpose": ((6, 3), L.Conv1DTranspose, {"filters": 4, "kernel_size": 3,
                                                     "strides": 2}, -1),
    "conv2d_transpose": ((5, 5, 3), L.Conv2DTranspose, {"filters": 4, "kernel_size": 3,
                                                        "strides": 2}, -1),
    "conv3d_transpose": ((3, 3, 3, 2), L.Conv3DTranspose, {"filters": 3, "kernel_size": 2,
                                                           "strides": 2}, -1),
    "separable1d": ((9, 3), L.SeparableConv1D, {"filters": 4, "kernel_size": 3,
                                                "depth_multiplier": 2}, -1),
    "separable2d": ((8, 8, 3), L.SeparableConv2D, {"filters": 4, "kernel_size": 3}, -1),
}


def producer_model(kind, rng, *, bn):
    """Input → producer (no bias) → BN, or with bn=None: Input → producer (random bias)."""
    shape, producer, arguments, axis = PRODUCERS[kind]
    inputs = keras.Input(shape)
    outputs = producer(**arguments, use_bias=bn is None)(inputs)
    if bn is not None:
        outputs = bn(axis=axis)(outputs)
    model = keras.Model(inputs, outputs)
    randomize_bn(model, rng)
    randomize_biases(model, rng)
    return model


@pytest.mark.parametrize("kind", PRODUCERS)
def test_each_producer_folds_and_verifies_in_onnx_runtime(kind, rng, tmp_path):
    # Alternate the two BN classes over the grid: both must fold the same way.
    bn = (L.BatchNormalization, kerasbn.BatchNormalization)[list(PRODUCERS).index(kind) % 2]
    model = producer_model(kind, rng, bn=bn)
    report = to_onnx(model, tmp_path / "model.onnx")

    assert fold_counts(report) == (1, 0, 0)
    assert report.verified_samples == 8
    without_bn = convert(producer_model(kind, rng, bn=None))
    folded_ops = operators(tmp_path / "model.onnx")
    assert "BatchNormalization" not in folded_ops
    assert folded_ops == operators(without_bn)
    assert report.node_count == sum(folded_ops.values()) <= report.unfolded_node_count


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_bn_with_an_activation_folds_into_the_conv_and_verifies(activation, rng, tmp_path):
    """conv → BN(activation) exports as conv(activation): ONNX Runtime agrees with the Keras
    model (`to_onnx` verifies, and here again), and no BN multiply-add is left: the operators
    are those of the same conv with the activation and a bias."""

    def model(bn):
        inputs = keras.Input((8, 8, 3))
        conv = L.Conv2D(4, 3, use_bias=not bn, activation=None if bn else activation)
        outputs = conv(inputs)
        if bn:
            outputs = kerasbn.BatchNormalization(activation=activation)(outputs)
        built = keras.Model(inputs, outputs)
        randomize_bn(built, rng)
        randomize_biases(built, rng)
        return built

    original = model(bn=True)
    report = to_onnx(original, tmp_path / "model.onnx")

    assert fold_counts(report) == (1, 0, 0)
    folded_ops = operators(tmp_path / "model.onnx")
    assert "BatchNormalization" not in folded_ops
    assert folded_ops == operators(convert(model(bn=False)))
    x = rng.standard_normal((5, 8, 8, 3)).astype("float32")
    (onnx_output,) = run_onnx(tmp_path / "model.onnx", x)
    expected = keras.ops.convert_to_numpy(original(x, training=False))
    np.testing.assert_allclose(onnx_output, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_node_counts_show_what_tf2onnx_leaves_unfolded(rng, tmp_path):
    # tf2onnx lowers a BN after a Dense to Mul + Add; folding removes both.
    report = to_onnx(producer_model("dense", rng, bn=L.BatchNormalization), tmp_path / "m.onnx")
    assert (report.node_count, report.unfolded_node_count) == (2, 3)  # MatMul, Add (+ Mul)


def test_one_by_one_branches_into_a_concat_leave_no_layout_reshape(rng, tmp_path):
    # InceptionV3's last blocks at 75×75, made small: on a 1×1 map tf2onnx leaves Reshapes to
    # the shape a tensor already has, more of them after Conv + bias (folded: 14 nodes) than
    # after Conv + the BN's Mul and Add (13), by the order its transposes reach the Concat.
    def conv_bn_relu(x):
        return L.ReLU()(L.BatchNormalization()(L.Conv2D(4, 1, use_bias=False)(x)))

    inputs = keras.Input((1, 1, 4))
    shared = conv_bn_relu(inputs)
    outputs = L.Concatenate()([conv_bn_relu(inputs), conv_bn_relu(shared), conv_bn_relu(shared)])
    model = keras.Model(inputs, outputs)
    randomize_bn(model, rng)
    report = to_onnx(model, tmp_path / "m.onnx")
    assert fold_counts(report) == (4, 0, 0)
    assert report.node_count == report.unfolded_node_count == 11
    # Only the two Reshapes that change a layout: NHWC in, NHWC out.
    assert operators(tmp_path / "m.onnx") == {"Reshape": 2, "Conv": 4, "Relu": 4, "Concat": 1}


# --- layers Keras computes in ways tf2onnx cannot read as they are --------------------------------

# Keras's TensorFlow backend runs these convolutions through an XLA-compiled function on CPU
# (grouped ones; channels_first 3-D; with newer Keras, channels_first 1-D and 2-D too).
XLA_CONVOLUTIONS = {
    "conv1d_groups": ((9, 4), L.Conv1D, {"filters": 6, "kernel_size": 3, "groups": 2}, -1),
    "conv2d_groups": ((8, 8, 4), L.Conv2D, {"filters": 6, "kernel_size": 3, "groups": 2}, -1),
    "conv3d_groups": ((5, 5, 5, 4), L.Conv3D, {"filters": 4, "kernel_size": 2, "groups": 4}, -1),
    "conv3d_channels_first": ((4, 6, 6, 6), L.Conv3D, {"filters": 5, "kernel_size": 3, **CF}, 1),
    "conv1d_channels_first": ((4, 9), L.Conv1D, {"filters": 5, "kernel_size": 3, **CF}, 1),
    "conv2d_channels_first_groups": ((4, 7, 7), L.Conv2D, {"filters": 6, "kernel_size": 3,
                                                           "groups": 2, **CF}, 1),
}


@pytest.mark.parametrize("case", XLA_CONVOLUTIONS.values(), ids=XLA_CONVOLUTIONS.keys())
def test_convolutions_keras_compiles_with_xla_export_as_plain_conv(case, rng, tmp_path):
    shape, layer, arguments, axis = case
    inputs = keras.Input(shape)
    outputs = L.BatchNormalization(axis=axis)(layer(**arguments, use_bias=False)(inputs))
    model = keras.Model(inputs, outputs)
    randomize_bn(model, rng)
    report = to_onnx(model, tmp_path / "m.onnx", baseline=False)
    assert fold_counts(report) == (1, 0, 0)
    ops = operators(tmp_path / "m.onnx")
    assert ops["Conv"] == 1 and "BatchNormalization" not in ops
    assert not [op for op in ops if "Call" in op]


def test_captured_constants_become_initializers_not_inputs(rng, tmp_path):
    # Keras's Normalization layer keeps its mean and variance as constant tensors, which a
    # traced function captures: EfficientNet starts with one.
    inputs = keras.Input((4,), name="x")
    normalization = L.Normalization(mean=[1.0, 2.0, 3.0, 4.0], variance=[1.0, 4.0, 9.0, 16.0])
    model = keras.Model(inputs, L.BatchNormalization()(L.Dense(3)(normalization(inputs))))
    randomize_bn(model, rng)
    to_onnx(model, tmp_path / "m.onnx")
    proto = onnx.load(tmp_path / "m.onnx")
    assert [i.name for i in proto.graph.input] == ["x"]


def test_exact_gelu_exports_through_erf(rng, tmp_path):
    # Keras's default GELU is exact: TensorFlow computes it with Erfc, which tf2onnx cannot
    # convert (every ConvNeXt has it).
    inputs = keras.Input((7,))
    x = L.Activation("gelu")(L.Dense(5)(inputs))
    model = keras.Model(inputs, L.BatchNormalization()(L.Dense(4, use_bias=False)(x)))
    randomize_bn(model, rng)
    report = to_onnx(model, tmp_path / "m.onnx", random_samples=64)
    assert report.verification.passed
    assert operators(tmp_path / "m.onnx")["Erf"] == 1


def test_raw_operations_and_masks_export(rng, tmp_path):
    inputs = keras.Input((5, 3))
    x = L.Masking()(inputs)  # its mask is a raw NotEqual operation in the graph
    x = L.BatchNormalization()(L.Dense(4, use_bias=False)(x))
    x = keras.ops.multiply(L.LSTM(3)(x), 2.0)
    model = keras.Model(inputs, keras.ops.add(x, 1.0))
    randomize_bn(model, rng)
    samples = rng.standard_normal((4, 5, 3)).astype("float32")
    samples[0, 2:] = 0.0  # masked steps
    report = to_onnx(model, tmp_path / "m.onnx", samples=samples)
    assert fold_counts(report) == (1, 0, 0) and report.verification.passed


# --- models, inputs and outputs ------------------------------------------------------------------


def test_sequential_with_several_folds(rng, tmp_path):
    model = keras.Sequential(
        [
            keras.Input((10, 10, 3)),
            L.Conv2D(4, 3, use_bias=False),
            L.BatchNormalization(),
            L.ReLU(),
            L.DepthwiseConv2D(3),
            kerasbn.BatchNormalization(),
            L.Flatten(),
            L.Dense(3),
            L.BatchNormalization(),
        ]
    )
    randomize_bn(model, rng)
    report = to_onnx(model, tmp_path / "seq.onnx")
    assert len(report.folded) == 3
    ops = operators(tmp_path / "seq.onnx")
    assert "Mul" not in ops and "BatchNormalization" not in ops


def test_in_memory_model_with_a_lambda_layer_folds_and_exports(rng, tmp_path):
    """Safe mode guards loading files; a model already in memory is already trusted."""
    model = keras.Sequential(
        [
            keras.Input((6,)),
            L.Lambda(lambda t: 2.0 * t),
            L.Dense(4, use_bias=False),
            L.BatchNormalization(),
        ]
    )
    randomize_bn(model, rng)
    report = to_onnx(model, tmp_path / "lambda.onnx")
    assert len(report.folded) == 1
    assert operators(tmp_path / "lambda.onnx")["Mul"] == 1  # the Lambda's; the BN's is folded


def test_sequential_built_without_an_input(rng, tmp_path):
    model = keras.Sequential([L.Dense(4, use_bias=False), L.BatchNormalization()])
    model.build((None, 3))
    randomize_bn(model, rng)
    assert len(to_onnx(model, tmp_path / "m.onnx").folded) == 1


def _two_in_two_out(rng):
    image = keras.Input((6, 6, 2), name="image")
    vector = keras.Input((5,), name="vector")
    x = L.Conv2D(3, 3, use_bias=False)(image)
    x = L.BatchNormalization()(x)
    x = L.GlobalAveragePooling2D()(x)
    y = L.Dense(3)(vector)
    y = L.BatchNormalization()(y)
    total = L.Add(name="total")([x, y])
    head = L.Dense(2, name="head")(y)
    model = keras.Model([image, vector], [total, head])
    randomize_bn(model, rng)
    return model


def test_several_inputs_and_outputs_keep_their_names(rng, tmp_path):
    model = _two_in_two_out(rng)
    samples = {"image": rng.standard_normal((3, 6, 6, 2)), "vector": rng.standard_normal((3, 5))}
    report = to_onnx(model, tmp_path / "m.onnx", samples=samples, random_samples=8)
    assert len(report.folded) == 2 and report.verified_samples == 3 + 8

    proto = onnx.load(tmp_path / "m.onnx")
    assert [i.name for i in proto.graph.input] == ["image", "vector"]
    assert sorted(o.name for o in proto.graph.output) == ["head", "total"]
    feed = {k: v.astype("float32") for k, v in samples.items()}
    session = onnxruntime.InferenceSession(
        str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]
    )
    total, head = session.run(["total", "head"], feed)
    expected = model([feed["image"], feed["vector"]], training=False)
    np.testing.assert_allclose(total, expected[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(head, expected[1], rtol=1e-4, atol=1e-5)


def test_samples_as_a_list_in_input_order(rng, tmp_path):
    model = _two_in_two_out(rng)
    samples = [rng.standard_normal((2, 6, 6, 2)), rng.standard_normal((2, 5))]
    report = to_onnx(model, tmp_path / "m.onnx", samples=samples, random_samples=0)
    assert report.verified_samples == 2


@pytest.mark.parametrize(
    "samples, message",
    [
        ({"image": np.zeros((2, 6, 6, 2))}, r"lacks the inputs \['vector'\]"),
        ([np.zeros((2, 6, 6, 2))], "Received: 1 arrays"),
        ([np.zeros((2, 6, 6, 3)), np.zeros((2, 5))], r"Received: shape=\(2, 6, 6, 3\)"),
        ([np.zeros((2, 6, 6, 2)), np.zeros((3, 5))], r"batch sizes=\[2, 3\]"),
    ],
)
def test_bad_samples_raise_before_writing(samples, message, rng, tmp_path):
    with pytest.raises(ValueError, match=message):
        to_onnx(_two_in_two_out(rng), tmp_path / "m.onnx", samples=samples)
    assert os.listdir(tmp_path) == []


def test_batch_dimension_is_dynamic(rng, tmp_path):
    model = producer_model("conv2d", rng, bn=L.BatchNormalization)
    to_onnx(model, tmp_path / "m.onnx")
    for batch in (1, 5):
        x = rng.standard_normal((batch, 8, 8, 3)).astype("float32")
        (got,) = run_onnx(tmp_path / "m.onnx", x)
        np.testing.assert_allclose(got, model(x, training=False), rtol=1e-4, atol=1e-5)


def test_unknown_dimensions_take_their_size_from_samples(rng, tmp_path):
    inputs = keras.Input((None, None, 3))
    x = L.Conv2D(4, 3, use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    model = keras.Model(inputs, L.GlobalAveragePooling2D()(x))
    randomize_bn(model, rng)
    with pytest.raises(ValueError, match="unknown dimension 1.*Received: samples=None"):
        to_onnx(model, tmp_path / "m.onnx")
    report = to_onnx(
        model, tmp_path / "m.onnx", samples=rng.standard_normal((2, 9, 7, 3)), random_samples=8
    )
    assert report.verified_samples == 2 + 8
    (got,) = run_onnx(tmp_path / "m.onnx", np.ones((1, 12, 5, 3), "float32"))
    assert got.shape == (1, 4)


def test_integer_inputs_get_valid_random_ids(rng, tmp_path):
    tokens = keras.Input((4,), dtype="int32")
    x = L.Embedding(10, 3)(tokens)
    x = L.Flatten()(x)
    x = L.Dense(2, use_bias=False)(x)
    model = keras.Model(tokens, L.BatchNormalization()(x))
    randomize_bn(model, rng)
    assert len(to_onnx(model, tmp_path / "m.onnx").folded) == 1


# --- what is not folded is still exported and reported -------------------------------------------


def test_refused_and_kept_bn_stay_in_the_graph_and_in_the_report(rng, tmp_path):
    inputs = keras.Input((4,))
    kept = L.BatchNormalization(name="kept_bn")(inputs)  # reads the input: nothing to fold into
    refused = L.BatchNormalization(name="refused_bn")(L.Dense(3, activation="relu")(inputs))
    model = keras.Model(inputs, [kept, refused])
    randomize_bn(model, rng)
    report = to_onnx(model, tmp_path / "m.onnx")

    assert fold_counts(report) == (0, 1, 1)
    assert report.unfolded_node_count == report.node_count
    assert operators(tmp_path / "m.onnx")["Mul"] == 2  # one multiply-add per BN
    text = str(report)
    assert "0 folded (0 forward), 1 refused, 1 kept" in text
    assert "refused refused_bn: " in text and "kept kept_bn: " in text


def test_no_fold_exports_the_model_as_it_is(rng, tmp_path):
    model = producer_model("dense", rng, bn=L.BatchNormalization)
    report = to_onnx(model, tmp_path / "m.onnx", fold=False)
    assert report.fold is None and report.folded == ()
    assert operators(tmp_path / "m.onnx")["Mul"] == 1
    assert report.node_count == report.unfolded_node_count
    assert "not folded" in str(report)


# --- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [13, 18])
def test_opsets_13_to_18(opset, rng, tmp_path):
    model = producer_model("conv1d", rng, bn=L.BatchNormalization)
    report = to_onnx(model, tmp_path / "m.onnx", opset=opset)
    proto = onnx.load(tmp_path / "m.onnx")
    onnx.checker.check_model(proto, full_check=True)
    assert report.opset == opset
    assert {o.domain: o.version for o in proto.opset_import}[""] == opset


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"opset": 12}, "Received: opset=12"),
        ({"opset": 19}, "Received: opset=19"),
        ({"opset": "17"}, "Received: opset='17'"),
        ({"opset": True}, "Received: opset=True"),
        ({"atol": -1.0}, "Received: atol=-1.0"),
        ({"rtol": float("nan")}, "Received: rtol=nan"),
        ({"random_samples": -1}, "Received: random_samples=-1"),
        ({"random_samples": 0}, "Received: samples=None, random_samples=0"),
    ],
)
def test_bad_arguments_raise_before_anything_is_written(arguments, message, rng, tmp_path):
    model = producer_model("dense", rng, bn=L.BatchNormalization)
    with pytest.raises(ValueError, match=message):
        to_onnx(model, tmp_path / "m.onnx", **arguments)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "model, path, arguments, error, message",
    [
        (None, "m.onnx", {}, TypeError, "`model` must be a Keras model. Received: model=None"),
        ("MODEL", "", {}, ValueError, "`path` must name a file. Received: path=''"),
        ("MODEL", None, {}, TypeError, "`path` must be a file path. Received: path=None"),
        ("MODEL", "missing/m.onnx", {}, ValueError, "directory of `path` does not exist"),
        ("MODEL", ".", {}, ValueError, "not a directory"),
        ("MODEL", "m.onnx", {"fold": "no"}, TypeError, "Received: fold='no'"),
        # Zero rows would leave nothing to verify: refused, not written unverified.
        ("MODEL", "m.onnx", {"samples": np.zeros((0, 6)), "random_samples": 0}, ValueError,
         r"`samples` holds no examples \(0 rows\)"),
    ],
)
def test_bad_model_or_path_raise_before_anything_changes(
    model, path, arguments, error, message, rng, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.onnx").write_bytes(b"previous export")
    model = producer_model("dense", rng, bn=L.BatchNormalization) if model == "MODEL" else model
    monkeypatch.setattr(onnx_module, "fold_batchnorm", lambda m: pytest.fail("work started"))
    with pytest.raises(error, match=message):
        to_onnx(model, path, **arguments)
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == b"previous export"


def test_unbuilt_model_raises():
    model = keras.Sequential([L.Dense(2)])
    with pytest.raises(ValueError, match="no defined inputs"):
        to_onnx(model, "never.onnx")


# --- verification --------------------------------------------------------------------------------


def _broken_fold(model):
    """fold_batchnorm with a bug: every bias of the folded model is off by 0.01."""
    folded, report = fold_batchnorm(model)
    for layer in folded.layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(layer.bias + 0.01)
    return folded, report


@pytest.mark.parametrize("previous", [False, True], ids=["no_file", "previous_file"])
def test_failed_verification_raises_with_the_numbers_and_writes_nothing(
    previous, rng, tmp_path, monkeypatch
):
    model = producer_model("dense", rng, bn=L.BatchNormalization)
    path = tmp_path / "m.onnx"
    if previous:
        path.write_bytes(b"previous export")
    monkeypatch.setattr(onnx_module, "fold_batchnorm", _broken_fold)

    with pytest.raises(VerificationError, match=r"max abs error 0\.01.*atol=1e-05, rtol=0\.0001"):
        to_onnx(model, path)
    assert os.listdir(tmp_path) == (["m.onnx"] if previous else [])
    if previous:
        assert path.read_bytes() == b"previous export"


def test_failed_conversion_names_the_operation_and_keeps_a_previous_file(rng, tmp_path):
    # ONNX has no inverse error function; tf2onnx leaves TensorFlow's Erfinv op as it is.
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.ops.erfinv(L.BatchNormalization()(inputs)))
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(ExportError, match=r"could not convert the TensorFlow operations \['Erfinv"):
        to_onnx(model, path)
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert path.read_bytes() == b"previous export"


def test_verify_false_writes_without_running(rng, tmp_path):
    report = to_onnx(producer_model("dense", rng, bn=L.BatchNormalization), tmp_path / "m.onnx",
                     verify=False)
    assert report.verified_samples == 0 and report.max_abs_error is None
    assert (tmp_path / "m.onnx").stat().st_size == report.file_size
    assert "not verified" in str(report)


# --- guarantees ----------------------------------------------------------------------------------


def test_the_original_model_is_never_mutated(rng, tmp_path):
    model = _two_in_two_out(rng)
    config = model.get_config()
    weights = [w.copy() for w in model.get_weights()]
    names = [layer.name for layer in model.layers]
    to_onnx(model, tmp_path / "m.onnx")
    assert model.get_config() == config
    assert [layer.name for layer in model.layers] == names
    for before, after in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)


def test_report_is_readable(rng, tmp_path):
    report = to_onnx(producer_model("conv1d", rng, bn=L.BatchNormalization), tmp_path / "m.onnx")
    assert isinstance(report, ExportReport)
    lines = str(report).splitlines()
    assert lines[0].startswith(f"{tmp_path / 'm.onnx'}: ") and "opset 17" in lines[0]
    assert f"{report.node_count} ONNX nodes (unfolded export: {report.unfolded_node_count})" in (
        lines[0]
    )
    assert lines[1] == "1 BatchNormalization layers: 1 folded (0 forward), 0 refused, 0 kept"
    assert lines[2].startswith("verified on 8 samples") and "max abs error" in lines[2]
