"""kerasbn.export.static_shapes: the shapes ONNX shape inference finds in the whole model, found
without handing it the weights."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kerasbn.export import static_shapes as static_shapes_module
from kerasbn.export.static_shapes import SMALL_INITIALIZER_BYTES, static_shapes


def conv_then_reshape():
    """x ─Conv (a weight larger than the small-initializer limit)─► ─Reshape (a constant)─► y"""
    weight = np.random.default_rng(0).standard_normal((64, 32, 3, 3)).astype("float32")
    assert weight.nbytes > SMALL_INITIALIZER_BYTES
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Reshape", ["c", "shape"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.array([0, 64, -1], dtype=np.int64), "shape"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_same_shapes_as_inference_on_the_whole_model():
    proto = conv_then_reshape()
    whole = onnx.shape_inference.infer_shapes(proto).graph
    expected = {
        info.name: tuple(d.dim_value if d.HasField("dim_value") else None
                         for d in info.type.tensor_type.shape.dim)
        for info in [*whole.input, *whole.value_info, *whole.output]
    }
    expected.update({i.name: tuple(i.dims) for i in whole.initializer})
    shapes = static_shapes(proto)
    assert shapes == expected
    assert shapes["c"] == (None, 64, 5, 5) and shapes["y"] == (None, 64, 25)


def test_inference_never_sees_the_weights(monkeypatch):
    proto = conv_then_reshape()
    seen = []
    infer = onnx.shape_inference.infer_shapes

    def recording(model, *args, **kwargs):
        seen.append(model)
        return infer(model, *args, **kwargs)

    monkeypatch.setattr(static_shapes_module.onnx.shape_inference, "infer_shapes", recording)
    static_shapes(proto)
    (skeleton,) = seen
    assert [i.name for i in skeleton.graph.initializer] == ["shape"]  # the constant is read
    assert skeleton.ByteSize() < SMALL_INITIALIZER_BYTES < proto.ByteSize()
    assert len(proto.graph.initializer) == 2  # the model itself is left as it was
