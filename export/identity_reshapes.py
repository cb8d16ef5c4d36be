"""Remove the Reshapes tf2onnx leaves that reshape a tensor to the shape it already has.

    x [N, C, 1, 1] ──Reshape(shape=[-1, C, 1, 1])──► y [N, C, 1, 1] ──► Concat
    becomes
    x [N, C, 1, 1] ──► Concat

Where they come from (tf2onnx 1.17): each NHWC convolution is wrapped in an NHWC→NCHW and an
NCHW→NHWC Transpose, and the transpose optimizer pushes the Transposes through the graph until
inverse pairs meet. The handler that should then cancel a Transpose followed by its inverse
never fires since tf2onnx 1.16 (onnx/tensorflow-onnx#2272 looks the second Transpose's
consumers up through a node named like its output tensor, and no node is; the fix, #2313, was
closed unmerged), so a pair that meets there is left as it is. Where the map is 1×1 (or has one
channel), the optimizer's last step turns every Transpose left into a Reshape, and the
back-to-back optimizer merges the two Reshapes of a pair into one Reshape to the shape its input
already has. How many pairs are left depends on the order the Transposes reach each Concat (the
first to arrive is pushed through, and each input whose Transpose has not arrived yet gets an
inverse pair in front), so a Conv with a bias (a folded BN) and a Conv followed by a BN's Mul
and Add leave different numbers: InceptionV3 at 75×75, 20 in its folded export and 16 in its
unfolded one (236 nodes against 232); NASNetMobile at 32×32, 97 and 105.

Why here and not in tf2onnx's optimizer: giving it the check #2272 meant (the second
Transpose's output read by one node) gives the same counts (InceptionV3: 216 and 216), but
changes what a third-party optimizer does to every graph, through a private method. This pass
rests on ONNX's definition of Reshape alone, and finds nothing to do once tf2onnx is fixed.

Preconditions, each checked per Reshape before anything changes (otherwise it stays):
  1. its shape is an initializer (a constant);
  2. shape inference knows its input's rank, and the shape keeps every size (`keeps_shape`):
     then the output is the input, element for element, for every input the graph accepts;
  3. its output is not a graph output (whose name is the model's interface) and is not read
     inside a subgraph (a Loop's or If's body, which reads outer names implicitly).
Readers of a removed Reshape's output read its input instead; its shape initializer goes when
nothing else reads it.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from kerasbn.export.static_shapes import static_shapes


def keeps_shape(input_shape, target, *, allowzero=False):
    """Whether ONNX's Reshape(x, `target`) has x's shape for every x of `input_shape`.

    `input_shape` holds sizes, None where unknown. In `target`, 0 copies the input's size
    (unless `allowzero`, where it means size 0) and one -1 is inferred from the element count.
    Every axis must keep its size: named (a known size, equal), copied (0), or inferred (-1)
    while every other size is known and non-zero, so that the inferred size, the element count
    divided by the others, is this axis's own.
    """
    target = list(target)
    if len(input_shape) != len(target):
        return False
    inferring = target.count(-1)
    if inferring > 1:
        return False
    for size, wanted in zip(input_shape, target, strict=True):
        if wanted == -1:
            continue
        if inferring and not size:  # unknown, or 0: the inferred size would divide by it
            return False
        if wanted == 0 and not allowzero:
            continue
        if size != wanted:
            return False
    return True


def remove_identity_reshapes(proto):
    """Remove from `proto` (in place) every Reshape that keeps its input's shape (see the
    module's preconditions); return how many were removed."""
    graph = proto.graph
    constants = {i.name: i for i in graph.initializer}
    reshapes = [
        node
        for node in graph.node
        if node.op_type == "Reshape"
        and node.domain in ("", "ai.onnx")
        and node.input[1] in constants
    ]
    if not reshapes:
        return 0  # shape inference reads the whole graph: only for a graph that may need it
    shapes = static_shapes(proto)
    fixed_names = {o.name for o in graph.output} | _read_in_subgraphs(graph)
    source_of = {}  # a removed Reshape's output → the tensor its readers read instead
    for node in reshapes:
        shape = shapes.get(node.input[0])
        target = numpy_helper.to_array(constants[node.input[1]])
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
        if (
            shape is not None
            and target.ndim == 1
            and node.output[0] not in fixed_names
            and keeps_shape(shape, target.tolist(), allowzero=allowzero)
        ):
            source_of[node.output[0]] = source_of.get(node.input[0], node.input[0])
    if not source_of:
        return 0
    # Deleted where they are, so no other node or weight is copied.
    removed = [i for i, node in enumerate(graph.node) if _removed(node, source_of)]
    shape_inputs = {graph.node[i].input[1] for i in removed}
    for index in reversed(removed):
        del graph.node[index]
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in source_of:
                node.input[index] = source_of[name]
    _drop_unread(graph, shape_inputs)
    stale = [index for index, info in enumerate(graph.value_info) if info.name in source_of]
    for index in reversed(stale):
        del graph.value_info[index]
    return len(source_of)


def _removed(node, source_of):
    return node.op_type == "Reshape" and node.output[0] in source_of


def _drop_unread(graph, names):
    """Drop the initializers among `names` that no node reads any more."""
    read = {name for node in graph.node for name in node.input} | _read_in_subgraphs(graph)
    unread = names - read - {o.name for o in graph.output}
    dropped = [index for index, i in enumerate(graph.initializer) if i.name in unread]
    for index in reversed(dropped):
        del graph.initializer[index]


def _read_in_subgraphs(graph):
    """Every tensor name a node inside one of `graph`'s subgraphs reads (at any depth)."""
    names = set()
    for node in graph.node:
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else []
            bodies += list(attribute.graphs)
            for body in bodies:
                names.update(name for inner in body.node for name in inner.input)
                names |= _read_in_subgraphs(body)
    return names
