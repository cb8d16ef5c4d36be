"""Int8 ONNX: kerasbn's folded int8 export against float32 and against Keras's own export.

For each model, three ONNX files run in ONNX Runtime (CPU), side by side:

  (a) kerasbn int8     `to_onnx(model, path, quantize="int8", calibration=...)`: BN folded,
                       tf2onnx, ONNX Runtime pre-processing + static QDQ quantization;
  (b) kerasbn float32  `to_onnx(model, path)`;
  (c) Keras + ORT int8 Keras's own `model.export(path, format="onnx")`, then the very same ONNX
                       Runtime pre-processing and quantization (`kerasbn.export.quantize.
                       quantize_model`, same calibration data and method).

Models: the digits convnet of `make demo` (Conv+BN ×3, DepthwiseConv+BN, Dense+BN; trained
here, with population statistics), MobileNetV2 and EfficientNetB0 (`weights=None`, 224×224,
logits; their BN statistics set by `kerasbn.population_statistics` on synthetic images, then
γ, β, mean and variance perturbed, so that no BN is an identity); and, beyond the issue's list,
a tabular MLP of three Dense(1024)+BN layers, the Dense+BN case at a size where int8 arithmetic
matters. Calibration and agreement use synthetic data (for images: smooth random fields plus
noise) except for the convnet, which uses the digits training / test images.

Reported per variant: latency at batch 1 and 32 (medians of interleaved samples, see
`_timing.interleaved_times`), file size, ONNX nodes in the file, Conv/Gemm/MatMul quantized,
multiply-adds by a constant left (what is left of an unfolded BN; counted in the graph as ONNX
Runtime runs it, so a float MatMul's bias Add, merged into a Gemm, is not one), top-1 agreement
and max |error| with the float Keras model, and for digits the test accuracy. As a control,
(a)'s file is also timed in a second ONNX Runtime session alongside the others: the ratio of
two sessions of one graph is the noise a ratio between variants must exceed. Where (a) and (c)
are the same graph as ONNX Runtime runs it, their ratio is reported as a TIE.

Targets: (a) ≥ 1.5× faster than (b) on MobileNetV2 at batch 32; (a) never slower than (c);
agreement ≥ 99% on digits; test accuracy drop ≤ 0.5 points on digits.

    .venv/bin/python benchmarks/int8_bench.py            # the recorded run
    .venv/bin/python benchmarks/int8_bench.py --quick    # a smoke run: 96×96, few repeats
"""

from __future__ import annotations

import kerasbn_programs

kerasbn_programs.quiet_tensorflow_import()  # before anything imports TensorFlow

import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import keras
import numpy as np
import onnx
import onnxruntime
import tensorflow as tf

import kerasbn
from kerasbn.export import quantize as int8
from kerasbn.export import to_onnx
from kerasbn.export.calibration import BATCH

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import _data  # noqa: E402  (examples/_data.py: the digits split)
import _timing  # noqa: E402  (a sibling file, not an installed module)
from convnet_export import build_convnet  # noqa: E402  (the demo's digits convnet)

MODELS = ("digits", "MobileNetV2", "EfficientNetB0", "mlp")
VARIANTS = ("a kerasbn int8", "b kerasbn float32", "c keras+ORT int8")
SECOND_SESSION = "a again"  # (a)'s file in a second ONNX Runtime session, timed alongside
SPEED_TARGET = 1.5  # (a) vs (b), MobileNetV2, batch 32
AGREEMENT_TARGET = 0.99  # digits
ACCURACY_DROP_TARGET = 0.005  # digits, absolute


@dataclass
class Variant:
    """One ONNX file and what was measured of it (None: not available, `error` says why)."""

    path: str | None = None
    error: str | None = None
    input_name: str | None = None
    extra_feed: dict = field(default_factory=dict)
    structure: int8.QuantizedStructure | None = None
    agreement: float | None = None
    max_abs_error: float | None = None
    accuracy: float | None = None
    latency: dict = field(default_factory=dict)
    # batch → samples of a second session of the same file, timed with the others: how far two
    # runs of one graph differ in this run (the noise a ratio between variants must exceed).
    second_session_latency: dict = field(default_factory=dict)

    @property
    def size(self):
        return os.path.getsize(self.path) if self.path else None

    @property
    def nodes(self):
        """Nodes in the file (an int8 file counts its QuantizeLinear/DequantizeLinear too)."""
        return len(onnx.load(self.path).graph.node) if self.path else None


# --- models and data -----------------------------------------------------------------------------


def smooth_images(count, size, rng, *, low, high):
    """Random images with some spatial structure: a 7×7 random field upsampled, plus noise."""
    coarse = rng.uniform(low, high, (count, 7, 7, 3)).astype("float32")
    images = tf.image.resize(coarse, (size, size), method="bilinear").numpy()
    noise = rng.normal(0.0, 0.05 * (high - low), images.shape).astype("float32")
    return np.clip(images + noise, low, high).astype("float32")


def application(name, size, rng):
    """`name` with weights=None, BN statistics of synthetic images, then perturbed."""
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classifier_activation=None
    )
    # MobileNetV2 expects inputs in [-1, 1]; EfficientNet rescales [0, 255] itself.
    low, high = (0.0, 255.0) if name.startswith("EfficientNet") else (-1.0, 1.0)
    set_bn_statistics(model, smooth_images(128, size, rng, low=low, high=high), rng)

    def images(count):
        return smooth_images(count, size, rng, low=low, high=high)

    return model, images(64), images(64), None


def mlp(rng, width=1024, depth=3, features=256):
    """A tabular MLP: (Dense → BN → ReLU) × depth, then 10 logits; the Dense+BN case at a size
    where int8 arithmetic matters (tf2onnx and ONNX Runtime leave each BN as a Mul + Add)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((features,), name="features")
    h = inputs
    for i in range(depth):
        h = keras.layers.Dense(width, use_bias=False, name=f"dense{i}")(h)
        h = kerasbn.BatchNormalization(name=f"bn{i}")(h)
        h = keras.layers.ReLU()(h)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(h), name="mlp")

    def rows(count):
        return rng.standard_normal((count, features)).astype("float32")

    set_bn_statistics(model, rows(512), rng)
    return model, rows(256), rows(256), None


def set_bn_statistics(model, data, rng):
    """Statistics of `data` (`kerasbn.population_statistics`), then γ, β, mean and variance
    perturbed a little: no BN is an identity, and activations keep realistic ranges."""
    kerasbn.population_statistics(model, data, verbose=0)
    for layer in model.layers:
        if isinstance(layer, (keras.layers.BatchNormalization, kerasbn.BatchNormalization)):
            shape = tuple(layer.moving_mean.shape)
            layer.gamma.assign(layer.gamma * rng.uniform(0.7, 1.3, shape))
            layer.beta.assign(layer.beta + rng.normal(0.0, 0.1, shape))
            std = np.sqrt(layer.moving_variance.numpy())
            layer.moving_mean.assign(layer.moving_mean + rng.normal(0.0, 0.1, shape) * std)
            layer.moving_variance.assign(layer.moving_variance * rng.uniform(0.8, 1.25, shape))


def digits(epochs):
    """The demo's convnet trained on digits, population statistics set; its data."""
    data = _data.load("digits")
    keras.utils.set_random_seed(0)
    model = build_convnet(data.input_shape)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(data.x_train, data.y_train, batch_size=32, epochs=epochs, verbose=0)
    kerasbn.population_statistics(model, data.x_train, batch_size=32, verbose=0)
    return model, data.x_train[:256], data.x_test, data.y_test


# --- the three variants --------------------------------------------------------------------------


def kerasbn_variants(model, calibration, directory):
    """(a) and (b), written without `to_onnx`'s own check: all three variants are compared
    with Keras by this script, on the same data, so that (c), which has no such check, is
    measured the same way."""
    variants = {}
    for label, quantize in zip(VARIANTS[:2], ("int8", None), strict=True):
        path = os.path.join(directory, f"kerasbn_{quantize or 'float32'}.onnx")
        try:
            to_onnx(model, path, quantize=quantize, calibration=calibration if quantize else None,
                    verify=False, baseline=False)
        except Exception as error:  # noqa: BLE001  (reported in the table, not hidden)
            variants[label] = Variant(error=_short(error))
        else:
            proto = onnx.load(path)
            extra = [i.name for i in proto.graph.input][len(model.inputs):]
            variants[label] = Variant(path, structure=structure_as_run(path)) if (
                not extra) else Variant(error=f"the file has graph inputs besides the model's: "
                                              f"{extra}")
    return variants


def structure_as_run(path):
    """The structure of a file as ONNX Runtime runs it: after its basic graph optimizations,
    which, for instance, merge a float MatMul and its bias Add into one Gemm (the int8 files
    get the same optimizations from `quant_pre_process`)."""
    if any(n.op_type == "DequantizeLinear" for n in onnx.load(path).graph.node):
        return int8.quantized_structure(onnx.load(path))
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = path + ".basic.onnx"
    onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return int8.quantized_structure(onnx.load(options.optimized_model_filepath))


def keras_variant(model, calibration, directory):
    """Keras's own ONNX export, quantized by the same ONNX Runtime calls as (a)."""
    float_path = os.path.join(directory, "keras_float32.onnx")
    path = os.path.join(directory, "keras_int8.onnx")
    try:
        # Keras's export refuses a model that has never been called ("The model provided has
        # never called"); a user exports a model they have trained or run, so run it once.
        model.predict(calibration[:1], verbose=0)
        model.export(float_path, format="onnx", verbose=False)
        proto = onnx.load(float_path)
        image, *others = [i.name for i in proto.graph.input]
        extra = _keras_export_constants(model, others)
        feeds = [{image: calibration[i:i + BATCH], **extra}
                 for i in range(0, len(calibration), BATCH)]
        onnx.save(int8.quantize_model(proto, feeds, method="minmax"), path)
    except Exception as error:  # noqa: BLE001
        return Variant(error=_short(error))
    return Variant(path, input_name=image, extra_feed=extra, structure=structure_as_run(path))


def _keras_export_constants(model, names):
    """Values for the graph inputs Keras's export makes of a Normalization layer's constants.

    Keras 3.15's `model.export(format="onnx")` leaves the mean and variance of EfficientNet's
    Normalization layer as graph inputs (".../Sub/y:0" and ".../Sqrt/x:0"); fed the layer's
    own values, the file computes what the model does.
    """
    if not names:
        return {}
    (normalization,) = [layer for layer in model.layers
                        if isinstance(layer, keras.layers.Normalization)]
    values = {"Sub/y:0": normalization.mean, "Sqrt/x:0": normalization.variance}
    feed = {}
    for name in names:
        match = [v for suffix, v in values.items() if name.endswith(suffix)]
        if len(match) != 1:
            raise ValueError(f"Keras's export has an input this benchmark cannot feed: {name}")
        feed[name] = np.asarray(keras.ops.convert_to_numpy(match[0]), dtype="float32").reshape(
            1, 1, 1, -1)
    return feed


def session(path):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def measure_outputs(variants, model, x, labels):
    expected = keras.ops.convert_to_numpy(model.predict(x, batch_size=32, verbose=0))
    keras_accuracy = None if labels is None else float(np.mean(expected.argmax(1) == labels))
    # For the errors' scale; and how far apart the top two outputs are, relative to it: an
    # untrained network's top classes are nearly tied, so 8-bit rounding flips many.
    top2 = np.sort(expected, axis=1)[:, -2:]
    print(f"  Keras outputs on {len(x)} examples: max |value| {np.abs(expected).max():.3g}, "
          f"median top-1 − top-2 gap {np.median(top2[:, 1] - top2[:, 0]):.3g}")
    for variant in variants.values():
        if variant.path is None:
            continue
        runner = session(variant.path)
        name = variant.input_name or runner.get_inputs()[0].name
        got = np.concatenate([
            runner.run(None, {name: x[i:i + 32], **variant.extra_feed})[0]
            for i in range(0, len(x), 32)
        ])
        variant.agreement = float(np.mean(got.argmax(1) == expected.argmax(1)))
        variant.max_abs_error = float(np.abs(got - expected).max())
        if labels is not None:
            variant.accuracy = float(np.mean(got.argmax(1) == labels))
    return keras_accuracy


def measure_latency(variants, x, batch, args):
    def call(variant):
        runner = session(variant.path)
        feed = {variant.input_name or runner.get_inputs()[0].name: x[:batch],
                **variant.extra_feed}
        return lambda: runner.run(None, feed)

    calls = {label: call(v) for label, v in variants.items() if v.path is not None}
    a = variants[VARIANTS[0]]
    if a.path is not None:
        calls[SECOND_SESSION] = call(a)
    times = _timing.interleaved_times(calls, repeats=args.repeats, warmup=args.warmup,
                                      min_sample_seconds=args.min_sample)
    for label, samples in times.items():
        if label == SECOND_SESSION:
            a.second_session_latency[batch] = samples
        else:
            variants[label].latency[batch] = samples


# --- report --------------------------------------------------------------------------------------


def table(name, variants, keras_accuracy, batches):
    header = ["variant", *(f"batch {b}" for b in batches), "size", "nodes", "quantized",
              "mul/add left", "agreement", "max |err|"]
    if keras_accuracy is not None:
        header.append("accuracy")
    rows = [header]
    for label, v in variants.items():
        if v.path is None:
            rows.append([label, f"FAILED: {v.error}"])
            continue
        s = v.structure
        row = [label]
        row += [f"{v.latency[b].median * 1e3:.2f} ms ±{v.latency[b].spread:.0%}" for b in batches]
        row += [f"{v.size / 1e6:.2f} MB" if v.size > 1e6 else f"{v.size / 1e3:.1f} kB",
                str(v.nodes),
                f"{sum(s.quantized.values())}/{sum(s.totals.values())}",
                str(s.multiply_adds), f"{v.agreement:.2%}", f"{v.max_abs_error:.3g}"]
        if keras_accuracy is not None:
            row.append(f"{v.accuracy:.4f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows if i < len(r) and len(r) > 2) for i in range(len(header))]
    if keras_accuracy is not None:
        print(f"  Keras float32 test accuracy {keras_accuracy:.4f}")
    for row in rows:
        if len(row) == 2 and row[1].startswith("FAILED"):
            print(f"  {row[0]:<{widths[0]}}  {row[1]}")
        else:
            print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def verdicts(name, variants, keras_accuracy, batches):
    a, b, c = (variants[label] for label in VARIANTS)
    same_graph_as_run = bool(a.path and c.path) and graph_as_run(a.path) == graph_as_run(c.path)
    lines = []
    for batch in batches:
        if a.path and b.path:
            ratio = b.latency[batch].median / a.latency[batch].median
            cpu = b.latency[batch].cpu_median / a.latency[batch].cpu_median
            target = name == "MobileNetV2" and batch == 32
            mark = _timing.pass_fail(ratio >= SPEED_TARGET) + " " if target else ""
            lines.append(f"{mark}(a) vs (b) float32, batch {batch}: {ratio:.2f}× faster "
                         f"(cpu {cpu:.2f}×)" + (f", target ≥{SPEED_TARGET}×" if target else ""))
        if a.path and c.path:
            ratio = c.latency[batch].median / a.latency[batch].median
            cpu = c.latency[batch].cpu_median / a.latency[batch].cpu_median
            # Identical graphs do identical work: their ratio is the run's noise, not a result.
            verdict = "TIE " if same_graph_as_run else _timing.pass_fail(ratio >= 1.0) + " "
            lines.append(f"{verdict}(a) vs (c) Keras+ORT int8, batch {batch}: {ratio:.2f}× "
                         f"(cpu {cpu:.2f}×; target: never slower, ≥1.00×)")
        if a.path:
            again = a.second_session_latency[batch].median / a.latency[batch].median
            lines.append(f"     (a) vs (a) again, the same file in a second session, batch "
                         f"{batch}: {again:.2f}× (how far identical graphs differ here)")
    if a.path and c.path:
        ops_a, ops_c = operators(a.path), operators(c.path)
        if same_graph_as_run:
            lines.append("(a) and (c) are the same graph as ONNX Runtime runs them (every node, "
                         "in order, with its attributes, after its optimizations; only the "
                         "quantization parameters, calibrated separately, differ): a tie")
        if ops_a != ops_c:
            differ = sorted(op for op in ops_a | ops_c if ops_a[op] != ops_c[op])
            lines.append("operators (a) / (c): " + ", ".join(
                f"{op} {ops_a[op]}/{ops_c[op]}" for op in differ))
    if keras_accuracy is not None:
        lines.append(f"{_timing.pass_fail(a.agreement >= AGREEMENT_TARGET)} agreement of (a) "
                     f"with Keras: {a.agreement:.2%} (target ≥{AGREEMENT_TARGET:.0%})")
        drop = keras_accuracy - a.accuracy
        lines.append(f"{_timing.pass_fail(drop <= ACCURACY_DROP_TARGET)} accuracy drop of (a): "
                     f"{drop * 100:+.2f} points (target ≤{ACCURACY_DROP_TARGET * 100:.1f})")
    for line in lines:
        print(f"  {line}")


def graph_as_run(path):
    """The nodes ONNX Runtime executes for `path` (CPU, all its optimizations), in order: each
    as its operator and attributes. Names and the values of weights and of quantization
    parameters are left out: two files equal here do the same work."""
    with tempfile.TemporaryDirectory() as directory:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = os.path.join(directory, "optimized.onnx")
        onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        nodes = onnx.load(options.optimized_model_filepath).graph.node
    return [(node.op_type, node.domain, sorted(
        (a.name, tuple(a.ints) or tuple(a.floats) or a.i or a.f or a.s) for a in node.attribute
    )) for node in nodes]


def operators(path):
    return Counter(node.op_type for node in onnx.load(path).graph.node)


def _short(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:300]


# --- main ----------------------------------------------------------------------------------------


def run_model(name, args, directory):
    print(f"\n{name}", flush=True)
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    if name == "digits":
        model, calibration, x, labels = digits(args.epochs)
    elif name == "mlp":
        model, calibration, x, labels = mlp(rng)
    else:
        model, calibration, x, labels = application(name, args.size, rng)
    variants = kerasbn_variants(model, calibration, directory)
    variants[VARIANTS[2]] = keras_variant(model, calibration, directory)
    variants = {label: variants[label] for label in VARIANTS}
    keras_accuracy = measure_outputs(variants, model, x, labels)
    for batch in args.batches:
        measure_latency(variants, np.concatenate([x] * (1 + batch // len(x))), batch, args)
    table(name, variants, keras_accuracy, args.batches)
    verdicts(name, variants, keras_accuracy, args.batches)
    print(f"  ({time.perf_counter() - start:.0f} s for this model)")


def main(argv=None):
    parser = _timing.benchmark_parser(__doc__.split("\n\n")[0], default_repeats=15)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--size", type=int, default=None,
                        help="input size of the applications (default 224, --quick 96)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="digits training epochs (default 10, --quick 2)")
    args = parser.parse_args(argv)
    args.size = args.size or (96 if args.quick else 224)
    args.epochs = args.epochs or (2 if args.quick else 10)
    args.repeats = args.repeats or (_timing.QUICK_REPEATS if args.quick else 15)
    args.warmup = 1 if args.quick else 3
    args.min_sample = 0.05 if args.quick else 0.3
    tf.get_logger().setLevel("ERROR")
    # Keras's ONNX export imports tf2onnx code that warns about NumPy internals, to no one here.
    warnings.filterwarnings("ignore", category=FutureWarning)

    print(
        f"int8_bench: TensorFlow {tf.__version__}, Keras {keras.__version__}, ONNX Runtime "
        f"{onnxruntime.__version__}, kerasbn {kerasbn.__version__}; "
        f"{len(os.sched_getaffinity(0))} CPU cores; load average at start "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
        + ("  [--quick: noisy]" if args.quick else "")
    )
    print(f"  {args.repeats} interleaved latency samples per variant (≥{args.min_sample} s "
          "each); medians ± interquartile range / median")
    with tempfile.TemporaryDirectory() as directory:
        for name in args.models:
            run_model(name, args, directory)
            keras.backend.clear_session()
    print(f"load average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
