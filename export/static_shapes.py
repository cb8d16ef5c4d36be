"""The static shapes of an ONNX graph's tensors, from ONNX shape inference run without weights.

    ModelProto ──large initializers declared as typed inputs (their data left out)──► skeleton
               ──onnx.shape_inference──► tensor name → shape

Shape inference serializes the model it is given, copies it and parses the copy back: on the
whole model that holds the weights three more times (ConvNeXtBase: 350 MiB each). The
skeleton keeps the nodes and every small initializer, so a constant that decides a shape (a
Reshape's shape, a Slice's bounds, a Resize's scales) is still read; a large initializer keeps
only its type and dimensions, which is all inference needs of a weight.
"""

from __future__ import annotations

import onnx

# Shape constants are a few int64 values; a weight that decides no shape is far larger.
SMALL_INITIALIZER_BYTES = 2**16


def static_shapes(proto):
    """Tensor name → its shape in `proto`: a tuple of sizes, None where a size is not known
    statically (symbolic or dynamic). Tensors whose rank is unknown are left out."""
    inferred = onnx.shape_inference.infer_shapes(_skeleton(proto))
    graph = inferred.graph
    shapes = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(
                size.dim_value if size.HasField("dim_value") else None
                for size in tensor_type.shape.dim
            )
    shapes.update({i.name: tuple(i.dims) for i in graph.initializer})
    return shapes


def _skeleton(proto):
    """`proto`'s graph without the data of its large initializers, for shape inference."""
    skeleton = onnx.ModelProto(ir_version=proto.ir_version, opset_import=proto.opset_import)
    skeleton.functions.extend(proto.functions)
    source, graph = proto.graph, skeleton.graph
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    inputs = {i.name for i in source.input}
    for initializer in source.initializer:
        if initializer.ByteSize() <= SMALL_INITIALIZER_BYTES:
            graph.initializer.append(initializer)
        elif initializer.name not in inputs:
            graph.input.append(
                onnx.helper.make_tensor_value_info(
                    initializer.name, initializer.data_type, initializer.dims
                )
            )
    return skeleton
