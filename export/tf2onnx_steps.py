"""A frozen GraphDef to an ONNX `ModelProto`: tf2onnx's `from_graph_def`, one step at a time.

    GraphDef ──grappler_request──► bytes ──optimize_graph_def: grappler as tf2onnx sets it up──►
             GraphDef
             ──to_onnx_proto: tf.Graph ──process_tf_graph──► tf2onnx graph  (tf.Graph freed)
                              ──tf2onnx's optimizers, in their order──► tf2onnx graph
                              ──make_model──► ModelProto                  (tf2onnx graph freed)

The steps of `tf2onnx.convert.from_graph_def` (1.17), without what made a large model's
conversion hold its weights dozens of times over (ResNet50, 98 MiB of weights: 10 GiB resident
after one conversion; ConvNeXtBase and InceptionResNetV2 passed 11 GiB) or vary from run to run:

- `from_graph_def` imports the graph into a session and freezes it once more through
  TensorFlow 1's API, then throws that away; ours is frozen already.
- Its optimizer loop runs each of a dozen optimizers, two or three rounds, on a `copy.deepcopy`
  of the whole graph, weights included, to roll back an optimizer that raises. A replaced copy
  is a cycle (nodes and graph point at each other) that only Python's cyclic collector frees,
  and a process holding TensorFlow's objects runs it rarely: the copies pile up. When memory
  runs short, the failing copy is rolled back like an optimizer bug ("Failed to apply
  fold_constants") and the conversion goes on less optimized. Here the optimizers run on the
  graph itself (as tf2onnx's own `--large_model` conversion runs them); only if one raises is
  the graph made again and optimized with tf2onnx's rollback, the dead copies collected first.
- Every optimizer ends by rewriting each node's ONNX proto, weights included; the protobuf
  runtime (upb) keeps a message's memory in an arena that only grows while the message lives,
  so each round left one more copy of every weight behind. `_Compacting` gives each node fresh
  protos after each optimizer.
- Its `tf_optimize` holds the GraphDef, a MetaGraphDef copy of it and that copy's serialization
  while grappler runs (and grappler itself holds about 9 times what it reads, measured on
  ConvNeXtSmall/Base): here the caller keeps only the serialized request (`grappler_request`),
  and grappler is called on those bytes as TensorFlow's `tf_optimizer.OptimizeGraph` calls it.
- The TensorFlow graph lived until the end; here each form is dropped as soon as the next
  exists, and collected at once when the graph is 16 MiB or more (`release`).
- Node order came from memory addresses and a process-wide name counter, and the transpose
  optimizer's result depends on order: DenseNet121 gave 462, 463 or 464 nodes. Here every
  conversion of a model is the same, byte for byte (`_OrderedGraph`, `_restart_names`).

tf2onnx's own `large_model=True` is no way out: 1.17 calls `numpy.product` there, which NumPy 2
removed. What this module reads and sets of tf2onnx beyond `from_graph_def` (its step
functions, its optimizer table, `Graph.extract_sub_graph_nodes`, a node's `_op` and `_attr`, the
name counter `utils.INTERNAL_NAME`), and of TensorFlow beyond `tf_optimizer.OptimizeGraph` (its
serialized entry point and lock), is here only, and tests/test_tf2onnx_steps.py probes it: the
result has `from_graph_def`'s operators and weights, grappler gives what tf2onnx's
`tf_optimize` gives, byte for byte, conversions of a model are identical, an optimizer that
raises is skipped as tf2onnx skips it, and the weights are held a few times.
"""

from __future__ import annotations

import gc

import onnx
import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from tensorflow.core.protobuf import config_pb2
from tensorflow.python.grappler import cluster as grappler_cluster
from tensorflow.python.grappler import tf_optimizer
from tensorflow.python.util import deprecation
from tf2onnx import graph as tf2onnx_graph
from tf2onnx import optimizer, tfonnx
from tf2onnx import utils as tf2onnx_utils

_FIRST_NAME_NUMBER = 1  # tf2onnx 1.17's `utils.INTERNAL_NAME` at import
# A full garbage collection takes 0.1-0.3 s in a process holding TensorFlow's objects, longer
# than converting a small model: worth it to free a large model's weights at once, not to free
# a few megabytes that the collector's own schedule frees anyway.
COLLECT_FROM_BYTES = 16 * 2**20


def release(graph_bytes):
    """Collect the reference cycles the last step left (a trace, a graph) when the graph they
    hold, `graph_bytes` long, is large enough to be worth a full collection."""
    if graph_bytes >= COLLECT_FROM_BYTES:
        gc.collect()


def grappler_request(graph_def, input_names, output_names):
    """The serialized MetaGraphDef that tf2onnx's `tf_optimize` hands grappler for `graph_def`.

    Serialized here so that the caller can drop `graph_def` before grappler runs: tf2onnx's
    `tf_optimize` holds the GraphDef, a MetaGraphDef copy of it and that copy's serialization
    while grappler (itself 9× the weights at its peak, measured on ConvNeXtSmall) runs.
    """
    # TensorFlow 1's API, which needs a graph (not eager) context; its deprecation notices
    # are no news to a user.
    with deprecation.silence(), tf.Graph().as_default():
        meta_graph = tf.compat.v1.train.export_meta_graph(graph_def=graph_def)
    meta_graph.collection_def["train_op"].node_list.value.extend(
        list(input_names) + list(output_names)
    )
    return meta_graph.SerializeToString()


def optimize_graph_def(request):
    """The GraphDef grappler makes of `request` (from `grappler_request`): constant folding,
    function inlining and dependency pruning, configured as tf2onnx 1.17's
    `tf_loader.tf_optimize_grappler` configures them for TensorFlow 2, run as TensorFlow's
    `tf_optimizer.OptimizeGraph` runs them, but on the bytes: no proto of the input is alive."""
    config = config_pb2.ConfigProto()
    config.graph_options.infer_shapes = True
    rewrite_options = config.graph_options.rewrite_options
    rewrite_options.optimizers[:] = ["constfold", "function", "dependency"]
    # Keeps quantize/dequantize pairs around constants (tf2onnx reads them as int8 weights).
    rewrite_options.experimental_disable_folding_quantization_emulation = True
    with tf_optimizer._OPTIMIZE_GRAPH_CLUSTER_LOCK:
        cluster = grappler_cluster.Cluster()
        try:
            optimized = tf_optimizer.tf_opt.TF_OptimizeGraphSerialized(
                cluster.tf_cluster, config.SerializeToString(), request,
                True, b"graph_to_optimize", False,  # verbose, graph id, strip default attributes
            )
        finally:
            cluster.Shutdown()
    return graph_pb2.GraphDef.FromString(optimized)


def to_onnx_proto(graph_def, *, input_names, output_names, opset, renames, doc):
    """The ONNX `ModelProto` tf2onnx makes of `graph_def` (from `optimize_graph_def`).

    `input_names` and `output_names` are graph tensor names; `renames` maps them to ONNX names;
    `doc` becomes the model's doc string. An optimizer that raises is skipped, as
    `from_graph_def` skips it (and tf2onnx logs it).
    """
    counter = tf2onnx_utils.INTERNAL_NAME
    try:
        return _to_onnx_proto(graph_def, input_names, output_names, opset, renames, doc)
    finally:
        # Later tf2onnx conversions in the process go on numbering past every name made here.
        tf2onnx_utils.INTERNAL_NAME = max(counter, tf2onnx_utils.INTERNAL_NAME)


def _to_onnx_proto(graph_def, input_names, output_names, opset, renames, doc):
    graph_bytes = graph_def.ByteSize()
    graph = _onnx_graph(graph_def, input_names, output_names, opset, renames, graph_bytes)
    in_place = {name: _compacting(make) for name, make in optimizer._get_optimizers().items()}
    try:
        graph = optimizer.optimize_graph(graph, catch_errors=False, optimizers=in_place)
    except Exception:  # noqa: BLE001  (an optimizer raises whatever it raises)
        # It may have left the graph half-changed: start again, with tf2onnx's rollback.
        del graph
        graph = _onnx_graph(graph_def, input_names, output_names, opset, renames, graph_bytes)
        on_copies = {name: _collected(make) for name, make in optimizer._get_optimizers().items()}
        graph = optimizer.optimize_graph(graph, catch_errors=True, optimizers=on_copies)
    proto = graph.make_model(doc)
    del graph
    release(graph_bytes)  # the tf2onnx graph: a cycle of nodes and graph that holds every weight
    return proto


def _onnx_graph(graph_def, input_names, output_names, opset, renames, graph_bytes):
    """tf2onnx's graph of `graph_def`, the TensorFlow graph it was read from freed."""
    _restart_names()
    with deprecation.silence(), tf.Graph().as_default() as tf_graph:
        tf.import_graph_def(graph_def, name="")
        graph = tfonnx.process_tf_graph(
            tf_graph,
            continue_on_error=True,  # as from_graph_def: an op without a handler stays as it is
            opset=opset,
            input_names=input_names,
            output_names=output_names,
            tensors_to_rename=renames,
        )
    del tf_graph
    release(graph_bytes)
    _keep_order(graph)
    return graph


def _keep_order(graph):
    graph.__class__ = _OrderedGraph
    for node in graph.get_nodes():
        for body in (node.get_body_graphs() or {}).values():
            _keep_order(body)


class _OrderedGraph(tf2onnx_graph.Graph):
    """tf2onnx's graph, whose pruning of unused nodes keeps the order of the nodes it keeps.

    tf2onnx 1.17 collects the nodes to keep in a set of node objects and makes the graph's node
    list of it (`delete_unused_nodes`, run after every optimizer): the nodes end up in the order
    of their memory addresses. The transpose optimizer then walks them in that order, and
    whether a transpose next to a 1×1 feature map is pushed through its neighbours or becomes a
    Reshape depends on which it meets first: DenseNet121 came out with 462, 463 or 464 nodes,
    conversion after conversion. Keeping the list's own order makes every conversion of a
    model the same, byte for byte; the nodes kept are those tf2onnx keeps.
    """

    def extract_sub_graph_nodes(self, outputs_name, input_checker=None, remove_unused_inputs=True):
        kept = super().extract_sub_graph_nodes(outputs_name, input_checker, remove_unused_inputs)
        position = {id(node): index for index, node in enumerate(self.get_nodes())}
        return sorted(kept, key=lambda node: position.get(id(node), len(position)))


def _restart_names():
    """Number tf2onnx's new node names from where a fresh process numbers them.

    tf2onnx names the nodes it makes `<name>__<N>`, N from one counter for the whole process,
    and its topological sort orders nodes by name before the transpose optimizer walks them:
    the N an earlier conversion left behind ("Conv__979" sorts after "Conv__1019") changed
    which transposes were pushed through and which became Reshapes (see `_OrderedGraph`).
    Names need to be unique within a graph only, so every conversion starting at tf2onnx's
    initial value is as safe as the first one in a process.
    """
    tf2onnx_utils.INTERNAL_NAME = _FIRST_NAME_NUMBER


class _Compacting:
    """A tf2onnx optimizer whose graph's node protos are made anew after it ran.

    Each optimizer ends with tf2onnx's `update_proto`, which clears every node's ONNX proto and
    appends its attributes again, weights included. The protobuf runtime (upb) keeps a message's
    memory in an arena that only grows until the message is freed, so every optimizer run
    leaves one more dead copy of every weight behind (measured: +98 MiB per optimizer run on
    ResNet50, 36 runs). A fresh copy of each proto holds only what is live.
    """

    def __init__(self, make_optimizer):
        self._optimizer = make_optimizer()

    @property
    def graph_been_opt(self):
        return self._optimizer.graph_been_opt

    def optimize(self, graph, iteration):
        graph = self._optimizer.optimize(graph, iteration)
        _compact(graph)
        return graph


def _compacting(make_optimizer):
    return lambda: _Compacting(make_optimizer)


def _compact(graph):
    """Give every node of `graph` (and of its subgraphs) protos without dead arena contents."""
    for node in graph.get_nodes():
        fresh = onnx.NodeProto()
        fresh.CopyFrom(node.op)
        node._op = fresh
        # Attributes read from the first proto share its arena, and so keep it alive.
        node._attr = {name: _copied(attribute) for name, attribute in node.attr.items()}
        for body in (node.get_body_graphs() or {}).values():
            _compact(body)


def _copied(message):
    fresh = type(message)()
    fresh.CopyFrom(message)
    return fresh


def _collected(make_optimizer):
    """`make_optimizer`, called after collecting the graph copies earlier optimizers replaced.

    tf2onnx's rollback copies the graph with `copy.deepcopy`, which makes fresh protos (so no
    compaction is needed) but leaves the replaced graph to the cyclic garbage collector.
    """

    def collect_then_make():
        gc.collect()
        return make_optimizer()

    return collect_then_make
