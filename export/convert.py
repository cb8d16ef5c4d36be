"""Convert a Keras model to an ONNX `ModelProto`: trace, freeze, convert with tf2onnx.

    model ──tf.function(input signature, batch None)──► concrete function
          ──freeze: variables and captured tensors become constants──► GraphDef
          ──XLA compile markers removed, so every function call can be inlined──►
          ──tf2onnx's steps (grappler inlines, then converts; `kerasbn.export.tf2onnx_steps`)──►
          ──the Reshapes tf2onnx leaves that change no shape removed
            (`kerasbn.export.identity_reshapes`)──► ModelProto

One form of the model's weights replaces the other: each step's input is released (and the
trace collected) once its output exists, so a large model is not held several times over. The
freezing stops at the frozen GraphDef (TensorFlow's `convert_variables_to_constants_v2` goes on
to build a function of it, 11× the weights resident at its peak), and grappler gets that graph
serialized, with no proto of it alive. Measured per stage: benchmarks/export_memory.py.

Why not `tf2onnx.convert.from_keras`: it reads Keras 2 internals and fails on Keras 3
Sequential models. Why not `from_function` (what Keras's own `model.export(format="onnx")`
uses): it names every non-variable capture of the function a graph input before freezing, so a
layer holding constant tensors (Keras's `Normalization`, in every EfficientNet) gives an ONNX
graph with inputs nobody can feed.

Why the XLA markers go: on CPU, Keras's TensorFlow backend runs the convolutions TensorFlow
cannot run natively (grouped, channels_first 3-D, and in newer Keras channels_first 1-D/2-D)
through a `tf.function(jit_compile=True)`. That is how TensorFlow executes them, not what they
compute; but a function marked for XLA is never inlined, and tf2onnx cannot convert the call
node it leaves. Without the marker the call inlines to an ordinary Conv op, which ONNX has.

After conversion the ONNX graph must have exactly the model's inputs, by name, and only ONNX
operators (tf2onnx keeps a TensorFlow op it cannot convert as it is); anything else is an
`ExportError` naming the difference.
"""

from __future__ import annotations

import numbers

import keras
import onnx
import tensorflow as tf
from tensorflow.python.framework import convert_to_constants  # no public equivalent in TF 2

from kerasbn.export import signature, tf2onnx_steps
from kerasbn.export.errors import ExportError
from kerasbn.export.identity_reshapes import remove_identity_reshapes
from kerasbn.export.static_shapes import static_shapes

OPSETS = range(13, 19)
# Attributes that keep TensorFlow's function inliner away from a function call.
_NOT_INLINED = ("_XlaMustCompile", "_noinline")


def check_opset(opset):
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral) or opset not in OPSETS:
        raise ValueError(
            f"`opset` must be an integer from {OPSETS.start} to {OPSETS.stop - 1}. "
            f"Received: opset={opset!r}"
        )


def convert(model, *, opset=17, input_names=None, output_names=None):
    """The ONNX `ModelProto` of `model` as it is (no fold, no check, no file).

    The batch dimension is dynamic. Inputs and outputs are named `input_names` and
    `output_names` (default: after the model's input and output layers, as
    `kerasbn.export.signature` does); a folded model passes its original's names.
    """
    check_opset(opset)
    specs = signature.input_specs(model)
    input_names = input_names or [spec.name for spec in specs]
    output_names = output_names or signature.output_names(model)
    graph_def, graph_inputs, graph_outputs = frozen_graph(model, specs, len(output_names))
    # The traced function: a cycle that holds the weights.
    tf2onnx_steps.release(graph_def.ByteSize())
    renames = dict(zip(graph_inputs, input_names, strict=True))
    renames.update(zip(graph_outputs, output_names, strict=True))
    # Grappler reads bytes: the weights are held once while it runs, not as the GraphDef, a
    # MetaGraphDef copy and its serialization at the same time.
    request = tf2onnx_steps.grappler_request(graph_def, graph_inputs, graph_outputs)
    del graph_def
    graph_def = tf2onnx_steps.optimize_graph_def(request)
    del request
    proto = tf2onnx_steps.to_onnx_proto(
        graph_def,
        input_names=graph_inputs,
        output_names=graph_outputs,
        opset=opset,
        renames=renames,
        doc=f"converted from Keras model {model.name!r} by kerasbn with tf2onnx",
    )
    del graph_def
    _set_conv_groups(proto)
    remove_identity_reshapes(proto)
    _check_graph(proto, input_names, opset)
    return proto


def frozen_graph(model, specs, output_count):
    """(GraphDef, input tensor names, output tensor names) of `model` called in inference mode,
    with every variable and captured tensor a constant and no function kept from inlining."""
    tensor_specs = [tf.TensorSpec((None, *s.shape[1:]), s.dtype, name=s.name) for s in specs]

    @tf.function(input_signature=tensor_specs, autograph=False)
    def forward(*tensors):
        outputs = keras.tree.flatten(model(signature.pack(model, list(tensors)), training=False))
        if len(outputs) != output_count:
            raise ExportError(
                f"The model returns {len(outputs)} tensors but declares {output_count} outputs. "
                f"Received: model={model.name!r}"
            )
        return tuple(outputs)

    function = forward.get_concrete_function()
    graph_def, constant_inputs = _frozen_graph_def(function)
    _allow_inlining(graph_def)
    _rewrite_unconvertible_ops(graph_def)
    constant_inputs = {id(function.graph.internal_captures[i]) for i in constant_inputs}
    inputs = [
        t.name for t in function.inputs if id(t) not in constant_inputs and t.dtype != tf.resource
    ]
    if len(inputs) != len(specs):
        # A capture that freezing could not turn into a constant would become an ONNX input.
        raise ExportError(
            f"The traced model takes {len(inputs)} tensors but has {len(specs)} inputs: "
            f"{inputs[len(specs):]} are values the model captures and freezing could not "
            f"make constant. Received: model={model.name!r}"
        )
    return graph_def, inputs, [t.name for t in function.outputs]


def _frozen_graph_def(function):
    """(GraphDef, indices of `function`'s captured inputs that became constants): the steps of
    TensorFlow's `convert_variables_to_constants_v2` up to the frozen GraphDef.

    That function goes on to import the GraphDef into a new concrete function, from which a
    caller reads a GraphDef back: 11× the weights resident at its peak (ConvNeXtSmall), and a
    function registered with the eager context for the rest of the process. The GraphDef is
    all the conversion needs; the tensor names are those of `function`.
    """
    data = convert_to_constants._FunctionConverterDataInEager(
        func=function, lower_control_flow=False, aggressive_inlining=True
    )
    return convert_to_constants._replace_variables_by_constants(converter_data=data)


def _allow_inlining(graph_def):
    for function in graph_def.library.function:
        for name in _NOT_INLINED:
            if name in function.attr:
                del function.attr[name]
        for node in function.node_def:
            _drop_attributes(node)
    for node in graph_def.node:
        _drop_attributes(node)


def _drop_attributes(node):
    for name in _NOT_INLINED:
        if name in node.attr:
            del node.attr[name]


def _set_conv_groups(proto):
    """Give every 3-D ONNX Conv (a kernel of rank 5) the group count its shapes imply.

    tf2onnx 1.17 derives a convolution's groups only for the 4-D data formats (NHWC, NCHW): a
    grouped Conv3D comes out with group=1, which ONNX Runtime refuses (input channels ≠ kernel
    channels · group). With input channels C and a kernel of C/g input channels, g is the only
    group count that fits.
    """
    kernel_ranks = {i.name: len(i.dims) for i in proto.graph.initializer}
    convs_3d = [
        n for n in proto.graph.node if n.op_type == "Conv" and kernel_ranks.get(n.input[1]) == 5
    ]
    if not convs_3d:
        return  # shape inference reads the whole graph: only for the case that needs it
    shapes = static_shapes(proto)
    for node in convs_3d:
        x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
        if not x or not w or len(x) < 2 or len(w) < 2 or not (x[1] and w[1]):
            continue  # channel counts unknown (None) or empty
        group = next((a for a in node.attribute if a.name == "group"), None)
        current = group.i if group is not None else 1
        if x[1] != w[1] * current and x[1] % w[1] == 0:
            if group is None:
                node.attribute.append(onnx.helper.make_attribute("group", x[1] // w[1]))
            else:
                group.i = x[1] // w[1]


def _rewrite_unconvertible_ops(graph_def):
    """Express TensorFlow ops tf2onnx 1.17 cannot convert in ones it can, in place.

    Erfc(x) = 1 − Erf(x): Keras's exact GELU (`approximate=False`, in every ConvNeXt) computes
    0.5·x·erfc(−x/√2). Where erfc is tiny, 1 − erf loses its relative precision but not its
    absolute one (about float32's epsilon), which is what GELU's product with x needs.
    """
    for node in [n for n in graph_def.node if n.op == "Erfc"]:
        dtype = node.attr["T"]
        one = graph_def.node.add(name=f"{node.name}/one", op="Const")
        one.attr["dtype"].type = dtype.type
        one.attr["value"].tensor.CopyFrom(
            tf.make_tensor_proto(1, dtype=tf.dtypes.as_dtype(dtype.type))
        )
        erf = graph_def.node.add(name=f"{node.name}/erf", op="Erf", input=list(node.input))
        erf.attr["T"].CopyFrom(dtype)
        # The node keeps its name, so whatever read erfc(x) now reads 1 − erf(x).
        node.op = "Sub"
        del node.input[:]
        node.input.extend([one.name, erf.name])


def _check_graph(proto, input_names, opset):
    initializers = {i.name for i in proto.graph.initializer}
    graph_inputs = [i.name for i in proto.graph.input if i.name not in initializers]
    extra = sorted(set(graph_inputs) - set(input_names))
    missing = sorted(set(input_names) - set(graph_inputs))
    if extra or missing:
        raise ExportError(
            "The ONNX graph's inputs differ from the Keras model's: it has inputs the model "
            f"does not ({extra}) and lacks ({missing}). Received: model inputs={input_names}"
        )
    onnx_domain = [n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx")]
    unconverted = sorted({op for op in onnx_domain if not onnx.defs.has(op)})
    if unconverted:
        raise ExportError(
            f"tf2onnx could not convert the TensorFlow operations {unconverted} to ONNX "
            f"(opset {opset}); the model uses an operation ONNX or tf2onnx does not have"
        )
