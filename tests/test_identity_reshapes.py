"""kerasbn.export.identity_reshapes: which Reshapes keep their input's shape (against NumPy's
reshape), and the graph pass that removes them: outputs unchanged in ONNX Runtime, every
Reshape the module's preconditions exclude left as it is."""

import numpy as np
import onnx
import onnxruntime
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from kerasbn.export.identity_reshapes import keeps_shape, remove_identity_reshapes


def reshaped(shape, target, allowzero):
    """The shape ONNX's Reshape gives an input of `shape` (all sizes known), by NumPy; None
    where ONNX refuses it (NumPy refuses the same: -1 with an empty remainder, a wrong count)."""
    resolved = [size if wanted == 0 and not allowzero else wanted
                for size, wanted in zip(shape, target, strict=False)]
    resolved += list(target[len(shape):])
    try:
        return np.empty(shape).reshape(resolved).shape
    except ValueError:
        return None


@st.composite
def reshapes(draw):
    """(sizes, which are known, target, allowzero): targets that name, copy (0), infer (-1)
    or change each size, sometimes of another rank."""
    rank = draw(st.integers(0, 4))
    sizes = draw(st.lists(st.integers(0, 3), min_size=rank, max_size=rank))
    known = draw(st.lists(st.booleans(), min_size=rank, max_size=rank))
    target = [draw(st.sampled_from([size, size, 0, -1, draw(st.integers(0, 3))])) for size in sizes]
    if draw(st.integers(0, 4)) == 0:
        target.append(1)
    return sizes, known, target, draw(st.booleans())


@settings(max_examples=400)  # pure arithmetic, milliseconds each: the profile's 25 miss cases
@given(reshapes(), st.data())
def test_keeps_shape_holds_for_every_input_numpy_reshapes(case, data):
    sizes, known, target, allowzero = case
    partial = tuple(size if k else None for size, k in zip(sizes, known, strict=True))
    claim = keeps_shape(partial, target, allowzero=allowzero)
    if all(known):  # nothing unknown: the claim is exactly NumPy's answer
        assert claim == (reshaped(sizes, target, allowzero) == tuple(sizes))
    if claim:  # and it holds whatever the unknown sizes turn out to be
        for _ in range(3):
            concrete = [s if s is not None else data.draw(st.integers(0, 5)) for s in partial]
            assert reshaped(concrete, target, allowzero) == tuple(concrete)


@pytest.mark.parametrize(
    ("shape", "target", "allowzero", "expected"),
    [
        ((None, 320, 1, 1), [-1, 320, 1, 1], False, True),  # what tf2onnx leaves at 1×1
        ((None, 1, 1, 320), [-1, 320, 1, 1], False, False),  # NHWC → NCHW: a layout change
        ((None, 4), [0, 4], False, True),
        ((None, None), [0, -1], False, False),  # -1 would divide by an unknown size
        ((2, 0), [2, -1], False, True),  # -1 is 0 elements / 2
        ((2, 0), [-1, 0], False, False),  # -1 is 0 elements / 0: ONNX refuses it
        ((2, 0), [2, 0], True, True),
        ((None, 4), [0, 4], True, False),  # allowzero: 0 means size 0
        ((None, 4), [-1, 4, 1], False, False),
        ((None, 4), [-1, -1], False, False),
        ((), [], False, True),
    ],
)
def test_keeps_shape_named_cases(shape, target, allowzero, expected):
    assert keeps_shape(shape, target, allowzero=allowzero) is expected


# --- the graph pass -------------------------------------------------------------------------------

NCHW_1X1 = ["N", 4, 1, 1]


def constant(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def model_of(nodes, *, initializers=(), x_shape=NCHW_1X1, outputs=("y",)):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        # Every graph here computes y of that shape, whatever x's shape.
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, NCHW_1X1) for name in outputs],
        list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(proto, x):
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})


def reshape_then_relu(x_shape=NCHW_1X1):
    """x ─Reshape to [-1, 4, 1, 1]─► r ─Relu─► y"""
    return model_of(
        [
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("Relu", ["r"], ["y"]),
        ],
        initializers=[constant("shape", [-1, 4, 1, 1])],
        x_shape=x_shape,
    )


def test_an_identity_reshape_goes_and_its_readers_read_its_input():
    proto = reshape_then_relu()
    assert remove_identity_reshapes(proto) == 1
    onnx.checker.check_model(proto, full_check=True)
    assert [(n.op_type, list(n.input)) for n in proto.graph.node] == [("Relu", ["x"])]
    assert not proto.graph.initializer  # the shape constant nothing reads any more
    x = np.random.default_rng(0).standard_normal((3, 4, 1, 1)).astype("float32")
    (y,) = run(proto, x)
    np.testing.assert_array_equal(y, np.maximum(x, 0))


def test_a_chain_of_identity_reshapes_goes_whole():
    proto = model_of(
        [
            helper.make_node("Reshape", ["x", "infer"], ["r1"]),
            helper.make_node("Reshape", ["r1", "copy"], ["r2"]),
            helper.make_node("Neg", ["r2"], ["y"]),
        ],
        initializers=[constant("infer", [-1, 4, 1, 1]), constant("copy", [0, 0, 1, 1])],
    )
    assert remove_identity_reshapes(proto) == 2
    assert [(n.op_type, list(n.input)) for n in proto.graph.node] == [("Neg", ["x"])]


def test_a_shape_another_reshape_still_reads_stays():
    proto = model_of(
        [
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("Relu", ["r"], ["a"]),
            helper.make_node("Transpose", ["a"], ["t"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", ["t", "shape"], ["y"]),  # NHWC → NCHW: kept
        ],
        initializers=[constant("shape", [-1, 4, 1, 1])],
    )
    assert remove_identity_reshapes(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["Relu", "Transpose", "Reshape"]
    assert [i.name for i in proto.graph.initializer] == ["shape"]
    x = np.random.default_rng(1).standard_normal((2, 4, 1, 1)).astype("float32")
    (y,) = run(proto, x)
    np.testing.assert_array_equal(y, np.maximum(x, 0))


def _if_reading(name):
    """An If whose branches read `name` from the enclosing graph."""
    def branch(label):
        return helper.make_graph(
            [helper.make_node("Identity", [name], [f"{label}_out"])], label, [],
            [helper.make_tensor_value_info(f"{label}_out", TensorProto.FLOAT, None)],
        )
    return helper.make_node("If", ["condition"], ["y"], then_branch=branch("then"),
                            else_branch=branch("else"))


KEPT = {
    "a layout change": lambda: reshape_then_relu(x_shape=["N", 1, 1, 4]),
    "a graph output": lambda: model_of(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        initializers=[constant("shape", [-1, 4, 1, 1])],
    ),
    "an input of unknown rank": lambda: reshape_then_relu(x_shape=None),
    "a shape computed in the graph": lambda: model_of(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("Relu", ["r"], ["y"]),
        ],
    ),
    "read inside a subgraph": lambda: model_of(
        [
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("Constant", [], ["condition"],
                             value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
            _if_reading("r"),
        ],
        initializers=[constant("shape", [-1, 4, 1, 1])],
    ),
}


@pytest.mark.parametrize("make", KEPT.values(), ids=KEPT.keys())
def test_reshapes_the_preconditions_exclude_stay(make):
    proto = make()
    before = proto.SerializeToString(deterministic=True)
    assert remove_identity_reshapes(proto) == 0
    assert proto.SerializeToString(deterministic=True) == before
