"""What folding BatchNormalization buys at inference: ONNX Runtime and Keras, folded vs unfolded.

For ResNet50 and MobileNetV2 (`weights=None`, every BN given random non-trivial statistics and
γ/β, logits out), at batch 1 and 32:

  * ONNX Runtime latency of `kerasbn.export.to_onnx` (folded) vs tf2onnx's export of the
    unfolded model, and their node counts;
  * Keras latency of the folded vs the unfolded model, both as a direct call
    `model(x, training=False)` (eager, op by op) and as `predict_on_batch` (a compiled graph);
  * wall time of `to_onnx` (fold + convert + verify, without the node-count baseline) vs the
    plain tf2onnx conversion of the unfolded model.

Variants are timed round-robin (`_timing.interleaved_times`) and compared by medians. Targets:
folded ONNX never slower than unfolded and with fewer nodes; folded Keras ≥ 1.15× faster.
tf2onnx itself merges a BN into a 4-D Conv that feeds only it, so for ResNet50 the two ONNX
files can be the same size: "never slower" is the target there, not "faster".

    .venv/bin/python benchmarks/export_bench.py            # the recorded run (quiet machine)
    .venv/bin/python benchmarks/export_bench.py --quick    # a smoke run: 64×64, few repeats
"""

from __future__ import annotations

import kerasbn_programs

kerasbn_programs.quiet_tensorflow_import()  # before anything imports TensorFlow

import argparse
import os
import statistics
import sys
import tempfile
import time

import keras
import numpy as np
import onnxruntime
import tensorflow as tf

import kerasbn
from kerasbn.export import fold_batchnorm, to_onnx
from kerasbn.export.convert import convert

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # a sibling file, not an installed module

MODELS = ("ResNet50", "MobileNetV2")
ONNX_TARGET = 1.0  # folded at least as fast
KERAS_TARGET = 1.15


def build(name, size, seed=0):
    """An application with random non-trivial BN statistics and γ/β (γ of both signs)."""
    keras.utils.set_random_seed(seed)
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classifier_activation=None
    )
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, (keras.layers.BatchNormalization, kerasbn.BatchNormalization)):
            shape = tuple(layer.moving_mean.shape)
            layer.gamma.assign(rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape))
            layer.beta.assign(rng.normal(0.0, 0.5, shape))
            layer.moving_mean.assign(rng.normal(0.0, 0.5, shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape))
    return model


def export_times(model, directory, repeats):
    """Median seconds of to_onnx (fold + convert + verify) and of a plain conversion, interleaved.

    Conversions take seconds to a minute, so they are timed one call per sample, a few times.
    Returns (medians, the folded file, the unfolded proto, the last ExportReport).
    """
    folded_path = os.path.join(directory, "folded.onnx")
    seconds = {"to_onnx": [], "tf2onnx": []}
    report = unfolded = None
    for r in range(repeats):
        for step in ("to_onnx", "tf2onnx")[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            if step == "to_onnx":
                report = to_onnx(model, folded_path, baseline=False)
            else:
                unfolded = convert(model)
            seconds[step].append(time.perf_counter() - start)
    medians = {step: statistics.median(values) for step, values in seconds.items()}
    return medians, folded_path, unfolded, report


def onnx_session(path_or_bytes):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(
        path_or_bytes, options, providers=["CPUExecutionProvider"]
    )


def latency_variants(model, folded_model, folded_path, unfolded_proto, batch, size):
    x = np.random.default_rng(1).standard_normal((batch, size, size, 3)).astype("float32")
    sessions = {
        "onnx folded": onnx_session(folded_path),
        "onnx unfolded": onnx_session(unfolded_proto.SerializeToString()),
    }
    tensor = tf.constant(x)
    variants = {
        label: (lambda s=session: s.run(None, {s.get_inputs()[0].name: x}))
        for label, session in sessions.items()
    }
    for label, m in (("folded", folded_model), ("unfolded", model)):
        variants[f"keras call {label}"] = lambda m=m: m(tensor, training=False)
        variants[f"keras predict {label}"] = lambda m=m: m.predict_on_batch(x)
    return variants


def ratio_line(label, times, target):
    unfolded = times[f"{label} unfolded"]
    folded = times[f"{label} folded"]
    ratio = unfolded.median / folded.median
    # CPU time is the steadier figure on a shared machine; the wall-clock ratio is the record.
    cpu_ratio = unfolded.cpu_median / folded.cpu_median
    return (
        f"  {label:<14}{_timing.format_ms(unfolded.median)} → {_timing.format_ms(folded.median)}"
        f"  {ratio:5.2f}×  (cpu {cpu_ratio:4.2f}×, IQR {unfolded.spread:.0%} / "
        f"{folded.spread:.0%})  {_timing.pass_fail(ratio >= target)} target ≥{target}×"
    )


def run_model(name, args, directory):
    model = build(name, args.size)
    folded_model, fold_report = fold_batchnorm(model)
    medians, folded_path, unfolded_proto, report = export_times(
        model, directory, args.export_repeats
    )
    nodes, unfolded_nodes = report.node_count, len(unfolded_proto.graph.node)
    print(f"\n{name} ({args.size}×{args.size}, {model.count_params():,} parameters)")
    print(f"  {fold_report.summary()}")
    same = "  (equal: tf2onnx merged every BN into its Conv itself)" if (
        nodes == unfolded_nodes
    ) else ""
    print(
        f"  ONNX nodes: {unfolded_nodes} unfolded → {nodes} folded  "
        f"{_timing.pass_fail(nodes < unfolded_nodes)} fewer nodes{same}"
    )
    parts = ", ".join(f"{step} {s:.1f} s" for step, s in report.seconds.items())
    print(
        f"  export: plain tf2onnx {medians['tf2onnx']:.1f} s, to_onnx {medians['to_onnx']:.1f} s "
        f"({medians['to_onnx'] / medians['tf2onnx']:.2f}×; last run: {parts}); "
        f"verified max abs error {report.max_abs_error:.2g}"
    )
    for batch in args.batches:
        variants = latency_variants(
            model, folded_model, folded_path, unfolded_proto, batch, args.size
        )
        times = _timing.interleaved_times(
            variants, repeats=args.repeats, warmup=args.warmup,
            min_sample_seconds=args.min_sample,
        )
        print(f"  batch {batch}: median per call, unfolded → folded, speed-up")
        print(ratio_line("onnx", times, ONNX_TARGET))
        print(ratio_line("keras call", times, KERAS_TARGET))
        print(ratio_line("keras predict", times, KERAS_TARGET))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 64×64 inputs, few short samples (noisy, not a record)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--size", type=int, default=None,
                        help="input height and width (default 224, --quick 64)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="latency samples per variant (default 25, --quick 3)")
    parser.add_argument("--export-repeats", type=int, default=None,
                        help="timed conversions per kind (default 3, --quick 1)")
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.quick else 224)
    args.repeats = args.repeats or (3 if args.quick else 25)
    args.export_repeats = args.export_repeats or (1 if args.quick else 3)
    args.warmup = 1 if args.quick else 3
    args.min_sample = 0.05 if args.quick else 0.5
    tf.get_logger().setLevel("ERROR")  # predict_on_batch per model retraces: expected here

    print(
        f"export_bench: TensorFlow {tf.__version__}, Keras {keras.__version__}, ONNX Runtime "
        f"{onnxruntime.__version__}, kerasbn {kerasbn.__version__}; "
        f"{len(os.sched_getaffinity(0))} CPU cores"
        + ("  [--quick: noisy]" if args.quick else "")
    )
    print(
        f"  {args.repeats} interleaved latency samples per variant (≥{args.min_sample} s each), "
        f"{args.export_repeats} timed conversions per kind; medians"
    )
    with tempfile.TemporaryDirectory() as directory:
        for name in args.models:
            run_model(name, args, directory)
            keras.backend.clear_session()
    return 0


if __name__ == "__main__":
    sys.exit(main())
