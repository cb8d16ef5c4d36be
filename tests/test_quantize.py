"""int8 export: calibration data, arguments, structure, agreement with Keras, and the CLI.

Agreement is checked against what we did not write: the int8 file run in ONNX Runtime here,
against the original Keras model on examples that were not used for calibration; "runs
quantized" is checked in the graph ONNX Runtime itself makes of the file (QLinearConv, QGemm, …).
"""

import os
from collections import Counter
from typing import NamedTuple

import keras
import numpy as np
import onnx
import onnxruntime
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import quantize_static

import kerasbn
from kerasbn.export import VerificationError, cli, fold_batchnorm, to_onnx
from kerasbn.export import onnx as onnx_module
from kerasbn.export import quantize as int8
from kerasbn.export.calibration import BATCH, CalibrationError, calibration_feeds
from kerasbn.export.quantize import quantized_structure
from tests.helpers import randomize_bn

L = keras.layers


class Spec(NamedTuple):
    name: str
    shape: tuple
    dtype: str = "float32"


ONE = [Spec("image", (None, 4, 4, 1))]
TWO = [Spec("a", (None, 3)), Spec("b", (None, 2, 2))]


def images(count, seed=0):
    return np.random.default_rng(seed).standard_normal((count, 4, 4, 1))


def two_inputs(count):
    rng = np.random.default_rng(1)
    return rng.standard_normal((count, 3)), rng.standard_normal((count, 2, 2))


def stacked(feeds, name):
    return np.concatenate([feed[name] for feed in feeds])


# --- calibration data: every accepted form -------------------------------------------------------


def test_an_array_becomes_float32_batches_capped_at_max_samples():
    x = images(100)
    feeds = calibration_feeds(x, ONE, max_samples=70)
    assert [len(f["image"]) for f in feeds] == [BATCH, BATCH, 70 - 2 * BATCH]
    assert all(f["image"].dtype == np.float32 for f in feeds)
    np.testing.assert_array_equal(stacked(feeds, "image"), x[:70].astype(np.float32))


@pytest.mark.parametrize("form", ["list", "tuple", "dict"])
def test_several_inputs_as_list_tuple_or_dict(form):
    a, b = two_inputs(5)
    data = {"list": [a, b], "tuple": (a, b), "dict": {"b": b, "a": a, "unused": a}}[form]
    (feed,) = calibration_feeds(data, TWO, max_samples=None)
    assert sorted(feed) == ["a", "b"]
    np.testing.assert_array_equal(feed["a"], a.astype(np.float32))
    np.testing.assert_array_equal(feed["b"], b.astype(np.float32))


def test_a_tensor_is_data():
    (feed,) = calibration_feeds(tf.constant(images(3)), ONE, max_samples=None)
    np.testing.assert_array_equal(feed["image"], images(3).astype(np.float32))


@pytest.mark.parametrize("element", ["x", "(x,)", "(x, y)", "(x, y, w)"])
def test_a_batched_dataset_of_x_or_keras_tuples(element):
    x, y = images(50), np.arange(50)
    slices = {"x": x, "(x,)": (x,), "(x, y)": (x, y), "(x, y, w)": (x, y, y * 0.5)}[element]
    dataset = tf.data.Dataset.from_tensor_slices(slices).batch(16)
    feeds = calibration_feeds(dataset, ONE, max_samples=40)
    np.testing.assert_allclose(stacked(feeds, "image"), x[:40], rtol=1e-6)


def test_an_unbatched_dataset_counts_each_element_as_one_example():
    x = images(10)
    feeds = calibration_feeds(tf.data.Dataset.from_tensor_slices(x), ONE, max_samples=None)
    np.testing.assert_allclose(stacked(feeds, "image"), x, rtol=1e-6)


def test_a_multi_input_dataset_of_dicts_with_labels():
    a, b = two_inputs(8)
    dataset = tf.data.Dataset.from_tensor_slices(({"a": a, "b": b}, np.zeros(8))).batch(3)
    feeds = calibration_feeds(dataset, TWO, max_samples=None)
    np.testing.assert_allclose(stacked(feeds, "b"), b, rtol=1e-6)


def test_an_endless_stream_is_read_only_up_to_max_samples():
    pulled = []

    def endless():
        while True:
            pulled.append(1)
            yield images(10, seed=len(pulled)), None

    feeds = calibration_feeds(endless(), ONE, max_samples=25)
    assert sum(len(f["image"]) for f in feeds) == 25
    assert len(pulled) == 3  # 30 examples read, not one batch more

    repeated = tf.data.Dataset.from_tensor_slices(images(4)).batch(4).repeat()
    assert sum(len(f["image"]) for f in calibration_feeds(repeated, ONE, max_samples=9)) == 9


@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6), max_samples=st.integers(1, 90))
def test_a_stream_keeps_its_order_and_stops_at_max_samples(sizes, max_samples):
    x = np.arange(sum(sizes) * 16, dtype=np.float32).reshape(-1, 4, 4, 1)
    ends = np.cumsum(sizes)
    pulled = []

    def stream():
        for end, size in zip(ends, sizes, strict=True):
            pulled.append(size)
            yield x[end - size:end]

    if sum(sizes) == 0:
        with pytest.raises(CalibrationError, match="holds no examples"):
            calibration_feeds(stream(), ONE, max_samples=max_samples)
        return
    feeds = calibration_feeds(stream(), ONE, max_samples=max_samples)
    np.testing.assert_array_equal(stacked(feeds, "image"), x[:max_samples])
    assert all(0 < len(f["image"]) <= BATCH for f in feeds)
    # Read up to the first batch that reaches max_samples, and not one batch more.
    enough = np.flatnonzero(ends >= max_samples)
    assert len(pulled) == (enough[0] + 1 if enough.size else len(sizes))


def test_a_generator_of_multi_input_tuples_inside_x_y():
    a, b = two_inputs(6)
    feeds = calibration_feeds(
        (((a[i:i + 2], b[i:i + 2]), None) for i in (0, 2, 4)), TWO, max_samples=None
    )
    np.testing.assert_allclose(stacked(feeds, "a"), a, rtol=1e-6)


# --- calibration data: every error ---------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "images.npy", 3.0, 7, object()],
                         ids=["None", "str", "float", "int", "object"])
def test_what_is_not_data_is_a_type_error(value):
    with pytest.raises(TypeError, match=r"`calibration` must be an array.*Received: calibration"):
        calibration_feeds(value, ONE, max_samples=None)


@pytest.mark.parametrize(
    "data, message",
    [
        (np.zeros((0, 4, 4, 1)), r"holds no examples. Received: ndarray of shape \(0, 4, 4, 1\)"),
        ([], "holds no examples. Received: an empty list"),
        ((x for x in []), "holds no examples. Received: an empty generator"),
        (np.zeros((5, 4, 4)), r"input 'image' must have shape \(None, 4, 4, 1\). Received: "
                              r"shape=\(5, 4, 4\)"),
        (np.zeros((5, 4, 3, 1)), r"Received: shape=\(5, 4, 3, 1\)"),
        ([np.zeros((5, 4, 4, 1))] * 2, r"one array per model input \(\['image'\]\). "
                                      "Received: 2 arrays"),
        ({"img": np.zeros((5, 4, 4, 1))},
         r"lacks the inputs \['image'\]. Received: calibration keys=\['img'\]"),
        (np.full((3, 4, 4, 1), np.nan), "NaN or infinite values.*Received: 48 non-finite of 48"),
        (iter([(1, 2, 3, 4)]), "must be \\(x,\\), \\(x, y\\) or \\(x, y, sample_weight\\). "
                               "Received: a tuple of 4 items"),
    ],
    ids=["empty-array", "empty-list", "empty-generator", "rank", "shape", "count", "keys", "nan",
         "tuple-4"],
)
def test_data_that_does_not_fit_is_a_calibration_error(data, message):
    with pytest.raises(CalibrationError, match=message):
        calibration_feeds(data, ONE, max_samples=None)


def test_batch_sizes_must_match_across_inputs():
    a, b = two_inputs(5)
    with pytest.raises(CalibrationError, match=r"Received: batch sizes=\[5, 4\]"):
        calibration_feeds([a, b[:4]], TWO, max_samples=None)


def test_a_non_array_inside_a_batch_is_a_type_error():
    a, _ = two_inputs(5)
    with pytest.raises(TypeError, match="`calibration` must hold numeric arrays"):
        calibration_feeds({"a": a, "b": "pixels"}, TWO, max_samples=None)


def test_the_error_names_samples_when_verification_data_is_wrong():
    with pytest.raises(CalibrationError, match="`samples` for input 'image'"):
        calibration_feeds(np.zeros((2, 3)), ONE, max_samples=None, name="samples")


# --- arguments of to_onnx, checked before any conversion -----------------------------------------


@pytest.fixture
def no_conversion(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("conversion started before the arguments were checked")

    monkeypatch.setattr(onnx_module, "convert", fail)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"quantize": "int4"}, ValueError, r"Received: quantize='int4'"),
        ({"quantize": "int8"}, ValueError, "needs `calibration`.*Received: calibration=None"),
        ({"calibration": "CAL"}, ValueError, "pass quantize='int8' too. Received: quantize=None"),
        ({"calibration_method": "kl"}, ValueError, "Received: calibration_method='kl'"),
        ({"calibration_samples": 0}, ValueError, "Received: calibration_samples=0"),
        ({"calibration_samples": True}, ValueError, "Received: calibration_samples=True"),
        ({"min_agreement": 1.5}, ValueError, "from 0 to 1. Received: min_agreement=1.5"),
        ({"min_agreement": "0.9"}, ValueError, "Received: min_agreement='0.9'"),
        ({"quantize": "int8", "calibration": "CAL", "samples": np.zeros((2, 3))},
         CalibrationError, r"`samples` for input .*Received: shape=\(2, 3\)"),
        ({"quantize": "int8", "calibration": np.zeros((0, 8, 8, 3))}, CalibrationError,
         "holds no examples"),
    ],
)
def test_bad_int8_arguments_raise_before_conversion(arguments, error, message, no_conversion,
                                                    tmp_path):
    model = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(2, 3), L.BatchNormalization()])
    calibration = np.zeros((4, 8, 8, 3))
    arguments = {k: calibration if isinstance(v, str) and v == "CAL" else v
                 for k, v in arguments.items()}
    with pytest.raises(error, match=message):
        to_onnx(model, tmp_path / "m.onnx", **arguments)
    assert os.listdir(tmp_path) == []


# --- structure -----------------------------------------------------------------------------------


def _node(op, inputs, output):
    return helper.make_node(op, inputs, [output])


def test_structure_counts_dequantized_weights_and_constant_multiply_adds():
    """A hand-made graph: one quantized Conv, one float Conv, and each kind of Mul/Add."""
    weight = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.int8), "w_q")
    float_weight = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w_f")
    scale = numpy_helper.from_array(np.ones(2, np.float32), "s")
    one = numpy_helper.from_array(np.array(2.0, np.float32), "one")
    nodes = [
        _node("DequantizeLinear", ["x_q", "s"], "x"),  # an activation: not a constant
        _node("DequantizeLinear", ["w_q", "s"], "w"),
        _node("Conv", ["x", "w"], "c1"),  # quantized
        _node("Conv", ["c1", "w_f"], "c2"),  # float weight, float input
        _node("Mul", ["c2", "one"], "m1"),  # by an initializer: counted
        _node("Add", ["m1", "w"], "a1"),  # by a dequantized initializer: counted
        _node("Mul", ["a1", "c1"], "m2"),  # of two activations (swish, SE): not counted
        _node("Add", ["m2", "x"], "out"),  # a residual add: not counted
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x_q", TensorProto.UINT8, None)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializer=[weight, float_weight, scale, one],
    )
    structure = quantized_structure(helper.make_model(graph))
    assert structure.quantized == {"Conv": 1}
    assert structure.totals == {"Conv": 2}
    assert structure.multiply_adds == 2
    assert structure.node_count == 8
    assert "Conv 1/2" in str(structure)


def convnet(rng, classes=5):
    """Conv+BN, DepthwiseConv2D+BN and Dense+BN, softmax out: every BN foldable."""
    inputs = keras.Input((10, 10, 3), name="image")
    x = L.Conv2D(8, 3, use_bias=False)(inputs)
    x = kerasbn.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.DepthwiseConv2D(3, use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Flatten()(x)
    x = L.Dense(16, use_bias=False)(x)
    x = kerasbn.BatchNormalization()(x)
    x = L.ReLU()(x)
    outputs = L.Dense(classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="convnet")
    randomize_bn(model, rng)
    return model


def patterns(count, rng, classes=5):
    """Noisy copies of one fixed random 10×10×3 pattern per class, and their classes."""
    templates = np.random.default_rng(42).standard_normal((classes, 10, 10, 3))
    labels = rng.integers(0, classes, count)
    return (templates[labels] + rng.standard_normal((count, 10, 10, 3))).astype("float32"), labels


@pytest.fixture(scope="module")
def trained():
    """The convnet trained for a few epochs, with population statistics: a model whose
    predictions depend on its input, as after real training (an untrained one puts many
    examples on near-ties, where any rounding flips the class)."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = convnet(rng)
    x, y = patterns(512, rng)
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=4, batch_size=32, verbose=0)
    kerasbn.population_statistics(model, x, verbose=0)
    return model


def ort_operators(path):
    """The operators of the graph ONNX Runtime's CPU provider makes of the file and runs."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path) + ".optimized"
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    operators = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    os.unlink(options.optimized_model_filepath)
    return operators


INT8_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger")


def test_folding_leaves_no_multiply_add_and_every_weighted_op_runs_int8(trained, rng, tmp_path):
    model = trained
    calibration, _ = patterns(64, rng)
    folded = to_onnx(model, tmp_path / "folded.onnx", quantize="int8", calibration=calibration)
    unfolded = to_onnx(model, tmp_path / "unfolded.onnx", quantize="int8", fold=False,
                       calibration=calibration)

    structure = folded.quantization.structure
    assert len(folded.folded) == 3
    assert structure.multiply_adds == 0
    assert structure.quantized == structure.totals  # every Conv/Gemm/MatMul
    assert sum(structure.totals.values()) == 4  # conv, depthwise conv, two Dense
    ops = ort_operators(tmp_path / "folded.onnx")
    assert sum(ops[op] for op in INT8_OPS) == 4
    assert "QLinearMul" not in ops and "QLinearAdd" not in ops and "Mul" not in ops

    # Unfolded, the Dense's BN stays a Mul + Add (ONNX Runtime merged the depthwise one itself).
    assert unfolded.quantization.structure.multiply_adds == 2
    assert {"QLinearMul", "QLinearAdd"} <= set(ort_operators(tmp_path / "unfolded.onnx"))


# --- end to end ----------------------------------------------------------------------------------


def keras_probabilities(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def test_int8_export_agrees_with_keras_on_unseen_inputs(trained, rng, tmp_path):
    model = trained
    calibration, _ = patterns(128, rng)
    unseen, _ = patterns(300, rng)
    path = tmp_path / "int8.onnx"
    report = to_onnx(model, path, quantize="int8", calibration=calibration, samples=unseen)

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": unseen})
    expected = keras_probabilities(model, unseen)
    agreement = np.mean(got.argmax(1) == expected.argmax(1))
    assert agreement >= 0.99
    check = report.quantization.check
    assert check.samples == report.verified_samples == 300
    assert check.agreement == pytest.approx(agreement)
    assert check.max_abs_error == pytest.approx(np.abs(got - expected).max(), rel=1e-6)
    assert check.mean_abs_error == pytest.approx(np.abs(got - expected).mean(), rel=1e-4)
    # 8-bit probabilities: off by a few 1/255 steps, not more.
    assert 0 < check.max_abs_error < 0.05
    assert report.quantization.calibration_samples == 128
    assert report.quantization.float_file_size > 0
    text = str(report)
    assert "top-1 agreement" in text and "Conv 2/2" in text and "calibrated on 128" in text


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_each_calibration_method_gives_an_agreeing_model(method, trained, rng, tmp_path):
    model = trained
    calibration, _ = patterns(64, rng)
    report = to_onnx(model, tmp_path / "m.onnx", quantize="int8", calibration=calibration,
                     calibration_method=method)
    assert report.quantization.method == method
    assert report.quantization.check.agreement >= 0.99


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_the_calibration_method_reaches_onnx_runtime(method, trained, rng, tmp_path,
                                                     monkeypatch):
    used = []

    def recording(*args, calibrate_method, **kwargs):
        used.append(calibrate_method)
        return quantize_static(*args, calibrate_method=calibrate_method, **kwargs)

    monkeypatch.setattr(int8, "quantize_static", recording)
    calibration, _ = patterns(32, rng)
    to_onnx(trained, tmp_path / "m.onnx", quantize="int8", calibration=calibration, verify=False,
            calibration_method=method)
    assert used == [int8.CALIBRATION_METHODS[method]]


def test_verified_on_calibration_data_when_no_samples(trained, rng, tmp_path):
    model = trained
    calibration = tf.data.Dataset.from_tensor_slices(patterns(80, rng)).batch(20)  # (x, y)
    report = to_onnx(model, tmp_path / "m.onnx", quantize="int8", calibration=calibration,
                     calibration_samples=50)
    assert report.quantization.calibration_samples == 50
    assert report.quantization.check.samples == 50


def test_verify_false_skips_the_check_but_reports_the_structure(rng, tmp_path):
    model = convnet(rng)  # untrained: nothing is compared
    report = to_onnx(model, tmp_path / "m.onnx", quantize="int8", verify=False,
                     calibration=rng.standard_normal((8, 10, 10, 3)))
    assert report.quantization.check is None and report.verified_samples == 0
    assert report.quantization.structure.multiply_adds == 0
    assert "int8 not verified" in str(report)


def test_low_agreement_raises_and_keeps_the_previous_file(trained, rng, tmp_path):
    """Ranges calibrated on inputs 1000× too small clip every real activation."""
    model = trained
    x, _ = patterns(200, rng)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(VerificationError, match="int8 top-1 agreement .* below min_agreement=0.99"
                       ) as caught:
        to_onnx(model, path, quantize="int8", calibration=x / 1000, samples=x)
    assert caught.value.report.quantization.check.agreement < 0.99
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_a_regression_output_is_reported_not_thresholded(rng, tmp_path):
    model = keras.Sequential([keras.Input((6,)), L.Dense(4, use_bias=False),
                              L.BatchNormalization(), L.ReLU(), L.Dense(1)])
    randomize_bn(model, rng)
    x = rng.standard_normal((64, 6)).astype("float32")
    report = to_onnx(model, tmp_path / "m.onnx", quantize="int8", calibration=x)
    check = report.quantization.check
    assert check.agreement is None and check.finite
    expected = keras_probabilities(model, x)
    assert check.max_abs_error <= 0.05 * np.abs(expected).max()
    assert "no classifier-shaped output" in str(report)


# --- the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_files(trained, tmp_path_factory):
    rng = np.random.default_rng(1)
    directory = tmp_path_factory.mktemp("int8")
    trained.save(directory / "model.keras")
    x, _ = patterns(96, rng)
    np.save(directory / "calibration.npy", x)
    np.savez(directory / "calibration.npz", image=x)
    np.save(directory / "wrong.npy", x[:, :5])
    (directory / "garbage.npy").write_bytes(b"not an array")
    return directory


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("data", ["calibration.npy", "calibration.npz"])
def test_cli_int8_export(data, int8_files, tmp_path, capsys):
    out_path = tmp_path / "m.onnx"
    code, out, err = run(capsys, "export", int8_files / "model.keras", "-o", out_path, "--int8",
                         "--calibration", int8_files / data, "--calibration-samples", "64",
                         "--min-agreement", "0.98")
    assert code == cli.EXIT_OK, err
    assert err == ""
    assert "calibrated on 64 samples with 'minmax'" in out
    assert "top-1 agreement" in out and "(min 98.00%)" in out
    assert "multiply-adds left outside them (Mul/Add by a constant, e.g. an unfolded BN): 0" in out
    ops = Counter(n.op_type for n in onnx.load(out_path).graph.node)
    assert ops["DequantizeLinear"] > 0
    assert out.rstrip().endswith(f"wrote {out_path}")


def test_cli_keeps_onnx_runtime_calibrator_prints_out(int8_files, tmp_path, capsys):
    code, out, err = run(capsys, "export", int8_files / "model.keras", "-o", tmp_path / "m.onnx",
                         "--int8", "--calibration", int8_files / "calibration.npy",
                         "--calibration-method", "entropy")
    assert code == cli.EXIT_OK, err
    assert "histogram" not in out and "histogram" not in err
    assert out.startswith(str(tmp_path / "m.onnx")) and "with 'entropy'" in out


def test_cli_int8_low_agreement_exits_1(int8_files, tmp_path, capsys, monkeypatch):
    def broken_fold(model):
        folded, report = fold_batchnorm(model)
        kernel = folded.get_layer("probabilities").kernel
        kernel.assign(kernel[:, ::-1])  # the classes in reverse order
        return folded, report

    monkeypatch.setattr(onnx_module, "fold_batchnorm", broken_fold)
    code, _, err = run(capsys, "export", int8_files / "model.keras", "-o", tmp_path / "m.onnx",
                       "--int8", "--calibration", int8_files / "calibration.npy")
    assert code == cli.EXIT_FAILED
    assert "verification failed: int8 top-1 agreement" in err and "nothing written" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--int8"], "--int8 and --calibration X.npy|X.npz go together"),
        (["--calibration", "calibration.npy"], "--int8 and --calibration"),
        (["--int8", "--calibration", "none.npy"], "no such calibration file"),
        (["--int8", "--calibration", "garbage.npy"], "cannot read the calibration file"),
        (["--int8", "--calibration", "wrong.npy"], "must have shape (None, 10, 10, 3)"),
        (["--min-agreement", "1.5"], "must be a number from 0 to 1, got 1.5"),
        (["--calibration-method", "kl"], "invalid choice: 'kl'"),
        (["--calibration-samples", "0"], "must be an integer >= 1, got 0"),
    ],
)
def test_cli_int8_bad_usage_exits_2(argv, message, int8_files, tmp_path, capsys):
    argv = [str(int8_files / a) if a.endswith((".npy", ".keras")) else a for a in argv]
    code, _, err = run(capsys, "export", int8_files / "model.keras", "-o", tmp_path / "m.onnx",
                       *argv)
    assert code == cli.EXIT_USAGE
    assert message in err, err
    assert os.listdir(tmp_path) == []


def test_report_names_int8_and_float32_node_counts(tmp_path, rng):
    inputs = keras.Input((6,))
    x = keras.layers.BatchNormalization()(keras.layers.Dense(8, use_bias=False)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.ReLU()(x)))
    calibration = rng.standard_normal((64, 6)).astype("float32")
    report = to_onnx(model, tmp_path / "m.onnx", quantize="int8", calibration=calibration,
                     min_agreement=0.0)
    first = str(report).splitlines()[0]
    assert report.node_count > report.float_node_count  # quantize/dequantize pairs
    assert (
        f"{report.node_count} ONNX nodes int8 (float32 export: {report.float_node_count}, "
        f"unfolded: {report.unfolded_node_count})" in first
    )
