"""verify: the tolerance, non-finite outputs, the Keras reference, and ONNX Runtime failures."""

import keras
import numpy as np
import onnx
import pytest

import kerasbn
from kerasbn.export import ExportError, to_onnx, verify
from kerasbn.export import verification as verify_module
from kerasbn.export.convert import convert
from kerasbn.export.float64_reference import float64_twin
from tests import reference
from tests.helpers import randomize_bn

L = keras.layers


def compare(onnx_values, keras_values, atol=1e-3, rtol=1e-2):
    errors = verify_module._Errors()
    errors.add("y", np.array(onnx_values), np.array(keras_values), atol=atol, rtol=rtol)
    return errors, errors.message(atol=atol, rtol=rtol)


def test_tolerance_is_atol_plus_rtol_times_each_examples_largest_value():
    keras_values = [[0.0, 100.0, -2.0], [0.0, 1.0, -0.5]]  # scales 100 and 1
    # allowed: 1e-3 + 1e-2 * 100 = 1.001 in the first example, 0.011 in the second
    inside, message = compare([[0.9, 101.0, -2.5], [0.0105, 1.005, -0.5]], keras_values)
    assert message == ""
    assert inside.max_abs == pytest.approx(1.0)
    assert inside.max_rel == pytest.approx(0.0105)  # |diff| / the example's scale
    outside, message = compare([[0.0, 101.002, -2.0], [0.012, 1.0, -0.5]], keras_values)
    assert outside.violations == 2
    assert (
        "output 'y' at (1, 0) of the samples inputs: onnx=0.012, keras=0, |diff|=0.012 > 0.011 "
        "allowed" in message
    )


def test_one_value_per_example_is_its_own_scale():
    _, message = compare([100.5, 0.0105], [100.0, 0.0], atol=1e-3, rtol=1e-2)
    assert "on 1 of 2 output values" in message and "at (1,) of the samples" in message


def test_a_failure_on_random_inputs_says_to_verify_on_real_ones():
    errors = verify_module._Errors()
    errors.add("y", np.array([[0.0, 1.0]] * 70), np.array([[0.0, 1.0]] * 69 + [[0.5, 1.0]]),
               atol=1e-5, rtol=1e-4, source="random", first_row=64)
    message = errors.message(atol=1e-5, rtol=1e-4)
    assert "at (133, 0) of the random inputs" in message
    assert "verify on real `samples` instead" in message


@pytest.mark.parametrize(
    "onnx_values, keras_values, expected",
    [
        ([np.nan, 1.0], [0.5, 1.0], "on 1 of 2 output values"),  # NaN where Keras is finite
        ([0.5, 1.0], [np.inf, 1.0], "on 1 of 2 output values"),
        ([np.nan, np.nan], [np.nan, np.nan], "every one of the 2 output values is NaN"),
        ([np.inf, np.nan], [np.inf, np.nan], "nothing could be compared"),
    ],
)
def test_non_finite_values_fail_unless_some_finite_value_agrees(
    onnx_values, keras_values, expected
):
    _, message = compare(onnx_values, keras_values)
    assert expected in message


def test_values_non_finite_in_both_are_counted_not_compared():
    errors, message = compare([np.nan, 1.0, 2.0], [np.nan, 1.0, 2.0005])
    assert message == ""
    assert (errors.non_finite, errors.elements, errors.max_abs) == (1, 3, pytest.approx(5e-4))


def _bias_model():
    """A channels_first Conv2D whose last axis has as many positions as it has filters, which
    Keras 3.15 computes wrongly when called eagerly (`model.predict` is right)."""
    inputs = keras.Input((3, 8, 6))
    conv = L.Conv2D(6, 1, data_format="channels_first")
    model = keras.Model(inputs, conv(inputs))
    conv.bias.assign(np.arange(6, dtype="float32"))
    return model


def test_reference_is_the_model_as_predict_runs_it(tmp_path):
    model = _bias_model()
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 6)).astype("float32")
    report = to_onnx(model, tmp_path / "m.onnx", samples=x)
    assert report.verification.passed
    # The file computes what predict computes, whatever an eager call says.
    session_out = verify(model, tmp_path / "m.onnx", x, random_samples=0)
    assert session_out.max_abs_error < 1e-5


def test_verify_any_onnx_file_against_a_keras_model(tmp_path, rng):
    inputs = keras.Input((5,))
    model = keras.Model(inputs, L.BatchNormalization(name="out")(L.Dense(4)(inputs)))
    randomize_bn(model, rng)
    onnx.save(convert(model), tmp_path / "m.onnx")
    result = verify(model, tmp_path / "m.onnx", rng.standard_normal((3, 5)), random_samples=4)
    assert result.passed and result.samples == 3 + 4
    assert str(result).startswith("verified on 7 samples")
    assert verify(model, tmp_path / "m.onnx", rng.standard_normal((3, 5))).samples == 3

    other = keras.Model(inputs, L.Dense(4, name="out")(inputs))  # another model: disagrees
    result = verify(other, tmp_path / "m.onnx")
    assert not result.passed and "FAILED: ONNX Runtime disagrees" in str(result)


def test_an_onnx_file_with_other_inputs_is_an_export_error(tmp_path):
    a = keras.Input((5,), name="a")
    onnx.save(convert(keras.Model(a, L.Dense(2)(a))), tmp_path / "m.onnx")
    b = keras.Input((5,), name="b")
    with pytest.raises(ExportError, match=r"inputs the model does not have: \['a'\]"):
        verify(keras.Model(b, L.Dense(2)(b)), tmp_path / "m.onnx")


def test_an_unreadable_onnx_file_is_an_export_error(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"not onnx")
    inputs = keras.Input((5,))
    with pytest.raises(ExportError, match="could not load the exported model"):
        verify(keras.Model(inputs, L.Dense(2)(inputs)), tmp_path / "m.onnx")


@pytest.mark.parametrize(
    "policy, expected",
    [("float32", (1e-5, 1e-4)), ("mixed_float16", (1e-3, 1e-2)), ("mixed_bfloat16", (1e-2, 8e-2))],
)
def test_default_tolerance_follows_the_compute_dtype(policy, expected):
    keras.mixed_precision.set_global_policy(policy)
    inputs = keras.Input((5,))
    x = L.Dense(4)(inputs)
    outputs = L.Activation("linear", dtype="float32")(kerasbn.BatchNormalization()(x))
    assert verify_module.default_tolerance(keras.Model(inputs, outputs)) == expected


def test_mixed_float16_model_exports_with_its_default_tolerance(tmp_path, rng):
    keras.mixed_precision.set_global_policy("mixed_float16")
    inputs = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3)(inputs)
    x = L.BatchNormalization()(x)
    x = L.GlobalAveragePooling2D()(L.ReLU()(x))
    x = L.BatchNormalization()(L.Dense(10)(x))
    model = keras.Model(inputs, L.Activation("softmax", dtype="float32")(x))
    randomize_bn(model, rng)
    for fold in (True, False):
        report = to_onnx(model, tmp_path / "m.onnx", fold=fold, random_samples=32)
        assert (report.atol, report.rtol) == (1e-3, 1e-2)
        # float16 arithmetic: errors of a few float16 units, far above float32's.
        assert 1e-6 < report.max_abs_error < 1e-3


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"atol": -1.0}, ValueError, "Received: atol=-1.0"),
        ({"rtol": float("nan")}, ValueError, "Received: rtol=nan"),
        ({"random_samples": 0}, ValueError, "Verification needs examples"),
        ({"samples": np.zeros((0, 5))}, ValueError, r"holds no examples \(0 rows\)"),
        ({"samples": np.zeros((2, 4))}, ValueError, r"must have shape \(None, 5\)"),
    ],
)
def test_bad_arguments_raise_before_running(arguments, error, message, tmp_path):
    inputs = keras.Input((5,))
    with pytest.raises(error, match=message):
        verify(keras.Model(inputs, L.Dense(2)(inputs)), tmp_path / "missing.onnx", **arguments)



def test_samples_of_one_input_model_as_array_list_or_numbers_agree():
    from kerasbn.export import signature

    specs = [signature.InputSpec("x", (None, 3), "float32")]
    x = np.arange(6.0).reshape(2, 3)
    for samples in (x, [x], (x,), x.tolist()):
        (array,) = signature.sample_arrays(specs, samples)
        np.testing.assert_array_equal(array, x)
    with pytest.raises(ValueError, match=r"one array per model input \(\['x'\]\)"):
        signature.sample_arrays(specs, [x, x])


# --- Keras's own float32 error: the comparison against the model in float64 ------------------


def test_float64_twin_computes_the_model_in_float64(rng):
    inputs = keras.Input((5,))
    dense = L.Dense(3)
    bn = kerasbn.BatchNormalization()
    model = keras.Model(inputs, bn(dense(inputs)))
    randomize_bn(model, rng)
    twin = float64_twin(model)
    x = rng.standard_normal((4, 5))
    got = keras.ops.convert_to_numpy(twin(x, training=False))
    kernel, bias = (np.asarray(w, np.float64) for w in dense.get_weights())
    expected = reference.inference(
        x @ kernel + bias, *(np.asarray(w, np.float64) for w in bn.get_weights()[:4]),
        axes=(-1,), epsilon=bn.epsilon,
    )
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def _cancelling_model(closeness=1e-4):
    """y = x·w − x·w′ with w′ within `closeness` of w: each product is ~1/closeness times y, so
    float32's rounding of the products is that much larger relative to y, and Keras in float32
    is far from exact."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 8)).astype("float32")
    w_near = (w * (1 + closeness * rng.standard_normal(w.shape))).astype("float32")
    inputs = keras.Input((64,), name="x")
    a, b = L.Dense(8, use_bias=False), L.Dense(8, use_bias=False)
    model = keras.Model(inputs, L.Subtract(name="y")([a(inputs), b(inputs)]))
    a.set_weights([w])
    b.set_weights([w_near])
    return model, w, w_near


def _onnx_in_float64(path, w, w_near):
    """An ONNX file of y = x·w − x·w′ computed in float64 (then rounded once): the exact
    function of the model's float32 weights, as far as float32 outputs can hold it."""
    h = onnx.helper
    weights = [
        onnx.numpy_helper.from_array(np.asarray(v, np.float64), name)
        for v, name in ((w, "w"), (w_near, "w_near"))
    ]
    nodes = [
        h.make_node("Cast", ["x"], ["x64"], to=onnx.TensorProto.DOUBLE),
        h.make_node("MatMul", ["x64", "w"], ["a"]),
        h.make_node("MatMul", ["x64", "w_near"], ["b"]),
        h.make_node("Sub", ["a", "b"], ["y64"]),
        h.make_node("Cast", ["y64"], ["y"], to=onnx.TensorProto.FLOAT),
    ]
    graph = h.make_graph(
        nodes, "exact", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 64])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 8])], weights,
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)


def test_an_export_as_exact_as_float32_allows_passes_where_keras_float32_is_not(tmp_path):
    model, w, w_near = _cancelling_model()
    _onnx_in_float64(tmp_path / "exact.onnx", w, w_near)
    x = np.random.default_rng(4).uniform(-100, 100, (16, 64)).astype("float32")
    result = verify(model, tmp_path / "exact.onnx", x)
    # Against Keras in float32 the exact file is out of tolerance: Keras's own error is larger.
    exact = x.astype(np.float64) @ (w.astype(np.float64) - w_near.astype(np.float64))
    keras_error = np.abs(np.asarray(model.predict(x, verbose=0), np.float64) - exact).max()
    assert keras_error > 1e-5 + 1e-4 * np.abs(exact).max()
    assert result.passed, result
    assert result.float32_error == pytest.approx(keras_error, rel=1e-6)
    assert result.max_abs_error < 1e-6 * np.abs(exact).max()  # to float64, ~float32 rounding
    assert "against the model in float64" in str(result)


def test_an_export_of_another_function_fails_against_float64_too(tmp_path):
    model, w, w_near = _cancelling_model()
    # w′ moved by a further 1e-5 relative: y changes by about a tenth of its size.
    _onnx_in_float64(tmp_path / "wrong.onnx", w, (w_near * (1 + 1e-5)).astype("float32"))
    x = np.random.default_rng(4).uniform(-100, 100, (16, 64)).astype("float32")
    result = verify(model, tmp_path / "wrong.onnx", x)
    assert not result.passed
    assert result.float32_error is not None
    assert "compared with the model computing in float64" in result.message


class _Doubling(L.Layer):
    """y = 2x, holding an argument Keras cannot serialize: the model has no config."""

    def __init__(self, unserializable, **kwargs):
        super().__init__(**kwargs)
        self.unserializable = unserializable

    def call(self, x):
        return 2.0 * x


def test_samples_that_leave_keras_float32_far_from_exact_fail_saying_so(tmp_path):
    model, w, w_near = _cancelling_model(closeness=1e-6)  # Keras float32 ~10 % from exact
    _onnx_in_float64(tmp_path / "exact.onnx", w, w_near)
    x = np.random.default_rng(4).uniform(-100, 100, (16, 64)).astype("float32")
    result = verify(model, tmp_path / "exact.onnx", x)
    assert not result.passed and result.float32_error is None
    assert "too ill-conditioned for any float32 file to be checked" in result.message


def test_a_model_without_a_float64_copy_keeps_the_plain_failure(tmp_path, rng):
    inputs = keras.Input((3,))
    dense = L.Dense(2)
    model = keras.Model(inputs, _Doubling(object())(dense(inputs)))
    onnx.save(convert(model), tmp_path / "m.onnx")
    dense.kernel.assign(dense.kernel + 1.0)  # the file no longer computes the model
    result = verify(model, tmp_path / "m.onnx", rng.standard_normal((4, 3)))
    assert not result.passed and result.float32_error is None
    assert "a float64 copy of the model" in result.message
