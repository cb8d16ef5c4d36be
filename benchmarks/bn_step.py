"""Time one batch-normalization training step on CPU: kerasbn vs Keras vs TF's fused kernel.

A step is forward + backward + statistics update: y = BN(x) in training mode, the gradients of
ℓ = Σ y·u with respect to x, gamma and beta for a fixed random upstream u, and the layer's
update of its moving statistics. The gradient is asked for as
`tape.gradient(y, ..., output_gradients=u)`, which is exactly ∇ℓ but without timing the loss's
own passes (a multiply-reduce forward and a broadcast backward), which belong to no BN
implementation. The step returns y with the gradients, so that no variant's forward output is
dropped as dead code (see `training_step`).

Variants, each as a `tf.function` with and without `jit_compile` around the whole step:
    kerasbn            kerasbn.BatchNormalization (its kernel is XLA-compiled either way)
    keras              keras.layers.BatchNormalization
    kerasbn relu       kerasbn.BatchNormalization(activation="relu"): BN→ReLU in the kernel
    keras +ReLU        keras.layers.BatchNormalization then keras.layers.ReLU
    fused_batch_norm   tf.compat.v1.nn.fused_batch_norm, updating its own moving averages with
                       the kernel's `exponential_avg_factor` (as TF-Keras 2 did), so it pays for
                       a statistics update like the layers do. It only takes 4-D input: the
                       dense (N, C) case runs as (N, 1, 1, C) NHWC, a free reshape.

Also inference mode (one multiply-add with the stored statistics) for kerasbn and Keras, and a
floor: the bytes an ideal kernel must move divided by this machine's copy bandwidth.

    .venv/bin/python benchmarks/bn_step.py            # the recorded run (quiet machine please)
    .venv/bin/python benchmarks/bn_step.py --quick    # a smoke run: few repeats, noisy
"""

from __future__ import annotations

import kerasbn_programs

kerasbn_programs.quiet_tensorflow_import()  # before anything imports TensorFlow

import os
import sys

import keras
import numpy as np
import tensorflow as tf

import kerasbn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # a sibling file, not an installed module

SHAPES = {
    "NHWC conv (32,56,56,64)": (32, 56, 56, 64),
    # The BN tensors of a small ResNet at batch 64 (benchmarks/model_step.py): 1–4 MiB.
    "NHWC conv (64,32,32,16)": (64, 32, 32, 16),
    "NHWC conv (64,16,16,32)": (64, 16, 16, 32),
    "NHWC conv (64,8,8,64)": (64, 8, 8, 64),
    "dense (256,1024)": (256, 1024),
}
MOMENTUM = 0.99
EPSILON = 1e-3

# Tensor-sized transfers an ideal training step makes, when a tensor does not stay in cache
# between passes (a statistic must be complete before anything depending on it is written):
#   forward:  read x (moments), read x + write y (normalize)                              = 3
#   backward: read dy and x (Σg, Σg·x̂), read dy and x + write dx                          = 5
# The statistics update touches per-channel vectors only. Keeping x̂ from the forward would
# not save anything: it would be written once and read twice instead of recomputing from x.
TRAINING_TRANSFERS = 8
# Inference: read x, write y.
INFERENCE_TRANSFERS = 2


# --- the variants ---------------------------------------------------------------------------


def layer_forward(layer, training):
    def forward(x):
        return layer(x, training=training)

    return forward


class FusedBatchNorm:
    """tf.compat.v1.nn.fused_batch_norm with its own variables and moving-average update."""

    def __init__(self, channels):
        self.gamma = tf.Variable(tf.ones([channels]))
        self.beta = tf.Variable(tf.zeros([channels]))
        self.moving_mean = tf.Variable(tf.zeros([channels]))
        self.moving_variance = tf.Variable(tf.ones([channels]))

    def __call__(self, x):
        x4 = x if x.shape.rank == 4 else tf.reshape(x, [x.shape[0], 1, 1, x.shape[-1]])
        # With mean/variance given and exponential_avg_factor < 1, the returned statistics are
        # the updated moving averages (variance Bessel-corrected, as kerasbn's default).
        y, new_mean, new_variance = tf.compat.v1.nn.fused_batch_norm(
            x4, self.gamma, self.beta, mean=self.moving_mean, variance=self.moving_variance,
            epsilon=EPSILON, is_training=True, exponential_avg_factor=1.0 - MOMENTUM,
        )[:3]
        self.moving_mean.assign(new_mean)
        self.moving_variance.assign(new_variance)
        return tf.reshape(y, x.shape)


def training_step(forward, params, *, jit):
    """A compiled step returning (y, [dx, dgamma, dbeta]) for upstream gradient u.

    y is returned so that every variant computes it: in a model y is always consumed, but a
    jit-compiled step that returned only the gradients would let XLA drop the forward's output
    pass wherever the backward does not read y (kerasbn's recomputes x̂ from x). Returning it
    costs every variant the same (its y is written to memory once, as in a model).
    """

    def step(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = forward(x)
        return y, tape.gradient(y, [x, *params], output_gradients=upstream)

    return tf.function(step, jit_compile=jit)


def build_variants(shape):
    """({name: step(x, u)}, {name: infer(x)}) for one input shape; every layer is built."""
    channels = shape[-1]
    ours = kerasbn.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON)
    theirs = keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON)
    ours_relu = kerasbn.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON, activation="relu")
    theirs_then_relu = keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON)
    relu = keras.layers.ReLU()
    fused = FusedBatchNorm(channels)
    for layer in (ours, theirs, ours_relu, theirs_then_relu):
        layer.build(shape)

    def keras_bn_relu(x):
        return relu(theirs_then_relu(x, training=True))

    implementations = {
        "kerasbn": (layer_forward(ours, True), [ours.gamma, ours.beta]),
        "keras": (layer_forward(theirs, True), [theirs.gamma, theirs.beta]),
        "fused_batch_norm": (fused, [fused.gamma, fused.beta]),
        "kerasbn relu": (layer_forward(ours_relu, True), [ours_relu.gamma, ours_relu.beta]),
        "keras +ReLU": (keras_bn_relu, [theirs_then_relu.gamma, theirs_then_relu.beta]),
    }
    training = {}
    for name, (forward, params) in implementations.items():
        training[name] = training_step(forward, params, jit=False)
        training[f"{name} +jit"] = training_step(forward, params, jit=True)
    inference = {}
    for name, layer in (("kerasbn", ours), ("keras", theirs)):
        inference[name] = tf.function(layer_forward(layer, False))
        inference[f"{name} +jit"] = tf.function(layer_forward(layer, False), jit_compile=True)
    return training, inference


def xla_pass_seconds(x, args):
    """Median time of y = x·s compiled with XLA: one read and one write of x at the rate
    TensorFlow's own generated code streams memory (a reachable floor for a compiled kernel,
    next to the copy's strict one)."""
    scale = tf.ones([x.shape[-1]])
    scaled = tf.function(lambda t, s: t * s, jit_compile=True)
    times = _timing.interleaved_times({"x·s": lambda: scaled(x, scale)}, repeats=args.repeats,
                                      warmup=args.warmup, min_sample_seconds=args.min_sample)
    return times["x·s"].median


def check_agreement(training, x, upstream):
    """All variants compute the same gradients (else the timings compare different things).

    Elementwise, to 1e-3 of the tensor's largest value, except at most one element in 10⁵:
    with a ReLU, a BN output that rounds to either side of 0 in two implementations flips the
    derivative of that element (one of 6.4 million for Keras BN + ReLU under XLA at
    (32,56,56,64)), a measure-zero difference, not a different computation. Returns (the
    largest relative difference elsewhere, the number of such flipped elements).
    """
    results = {name: [t.numpy() for t in step(x, upstream)[1]] for name, step in training.items()}
    worst, flipped = 0.0, 0
    for name, grads in results.items():
        reference = results["kerasbn relu" if "relu" in name.lower() else "kerasbn"]
        for ours, theirs in zip(reference, grads, strict=True):
            difference = np.abs(ours - theirs.reshape(ours.shape)) / (np.max(np.abs(ours)) + 1e-12)
            outliers = difference > 1e-3
            if outliers.sum() > max(1, ours.size // 100_000):
                raise RuntimeError(
                    f"{name} disagrees with kerasbn: {outliers.sum()} of {ours.size} gradient "
                    f"elements differ by more than 1e-3 of the largest"
                )
            flipped += int(outliers.sum())
            worst = max(worst, float(np.max(np.where(outliers, 0.0, difference))))
    return worst, flipped


# --- reporting ------------------------------------------------------------------------------


def print_table(title, times, *, floor):
    """Median wall time per variant, its spread, CPU time, distance from the floor, and how
    many times kerasbn's time in the same jit setting it is (> 1: kerasbn is faster)."""
    print(f"\n  {title}")
    print(f"  {'variant':<24}{'median':>12}{'IQR':>6}{'CPU':>13}{'÷ floor':>9}{'÷ kerasbn':>11}")
    for name, samples in times.items():
        # BN+ReLU variants against kerasbn's fused BN+ReLU, the others against plain kerasbn.
        base = "kerasbn relu" if "relu" in name.lower() else "kerasbn"
        ours = times[f"{base} +jit" if name.endswith("+jit") else base].median
        print(
            f"  {name:<24}{_timing.format_ms(samples.median)}{samples.spread:>6.0%}"
            f"{_timing.format_ms(samples.cpu_median)}{samples.median / floor:>9.2f}"
            f"{samples.median / ours:>10.2f}×"
        )


def print_targets(times, floor):
    """The issue's targets, each comparing like with like (same jit setting)."""
    t = {name: samples.median for name, samples in times.items()}
    targets = [
        ("≥4× faster than Keras BN under XLA (both steps jit)",
         t["keras +jit"] / t["kerasbn +jit"], lambda r: r >= 4.0, "×"),
        ("≥2.5× faster than Keras BN without XLA (both steps plain)",
         t["keras"] / t["kerasbn"], lambda r: r >= 2.5, "×"),
        ("BN+ReLU ≥2.5× faster than Keras BN + ReLU without XLA",
         t["keras +ReLU"] / t["kerasbn relu"], lambda r: r >= 2.5, "×"),
        ("BN+ReLU ≥2× faster than Keras BN + ReLU under XLA",
         t["keras +ReLU +jit"] / t["kerasbn relu +jit"], lambda r: r >= 2.0, "×"),
        ("no slower than fused_batch_norm (both steps plain)",
         t["fused_batch_norm"] / t["kerasbn"], lambda r: r >= 1.0, "×"),
        ("within 1.5× of the floor (faster kerasbn step)",
         min(t["kerasbn"], t["kerasbn +jit"]) / floor, lambda r: r <= 1.5, "× floor"),
    ]
    print("\n  targets (informational):")
    for label, ratio, ok, unit in targets:
        print(f"    {_timing.pass_fail(ok(ratio))}  {label}: {ratio:.2f}{unit}")


def run_shape(label, shape, args):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(1.0, 2.0, shape).astype(np.float32))
    upstream = tf.constant(rng.normal(0.0, 1.0, shape).astype(np.float32))
    training, inference = build_variants(shape)
    worst, flipped = check_agreement(training, x, upstream)

    nbytes = x.numpy().nbytes
    bandwidth, threads = _timing.best_copy_bandwidth(nbytes)
    train_floor = TRAINING_TRANSFERS * nbytes / bandwidth
    infer_floor = INFERENCE_TRANSFERS * nbytes / bandwidth

    print(f"\n=== {label}: float32, {nbytes / 2**20:.1f} MiB per tensor ===")
    if len(shape) != 4:
        print(f"  (fused_batch_norm takes 4-D input: it runs on x reshaped to "
              f"{(shape[0], 1, 1, shape[-1])}, NHWC)")
    print(
        f"  copy bandwidth at this size: {bandwidth / 1e9:.1f} GB/s (NumPy copy of one tensor "
        f"with {threads} thread(s), best of 1 and all cores; read + write both counted)"
    )
    print(
        f"  floor, training step: {TRAINING_TRANSFERS} tensor transfers × {nbytes / 1e6:.1f} MB / "
        f"bandwidth = {_timing.format_ms(train_floor).strip()}\n"
        "    forward: read x (moments), read x + write y (normalize) = 3;\n"
        "    backward: read dy, x (Σg, Σg·x̂), read dy, x + write dx = 5"
    )
    print(
        f"  floor, inference: {INFERENCE_TRANSFERS} transfers (read x, write y) = "
        f"{_timing.format_ms(infer_floor).strip()}"
    )
    xla_pass = xla_pass_seconds(x, args)
    print(
        f"  for scale: one XLA-compiled pass y = x·s (2 transfers) takes "
        f"{_timing.format_ms(xla_pass).strip()} = {xla_pass / infer_floor:.2f}× its floor; "
        f"{TRAINING_TRANSFERS} transfers\n    at that rate would take "
        f"{_timing.format_ms(xla_pass * TRAINING_TRANSFERS / 2).strip()}"
    )
    print(f"  gradients of all variants agree to {worst:.1e} (relative to the largest)"
          + (f", but for {flipped} element(s) at a ReLU kink" if flipped else ""))

    timed = {name: (lambda s=step: s(x, upstream)) for name, step in training.items()}
    times = _timing.interleaved_times(timed, repeats=args.repeats, warmup=args.warmup,
                                      min_sample_seconds=args.min_sample)
    print_table("training step (forward + backward + statistics update)", times,
                floor=train_floor)
    print_targets(times, train_floor)

    timed = {name: (lambda f=fn: f(x)) for name, fn in inference.items()}
    times = _timing.interleaved_times(timed, repeats=args.repeats, warmup=args.warmup,
                                      min_sample_seconds=args.min_sample)
    print_table("inference (training=False: one multiply-add)", times, floor=infer_floor)


def main(argv=None):
    parser = _timing.benchmark_parser(__doc__.split("\n\n")[0], default_repeats=25)
    parser.add_argument(
        "--shapes", nargs="+", choices=[shape_key(s) for s in SHAPES.values()], default=None,
        help="run only these shapes, e.g. 32x56x56x64 (default: all)",
    )
    args = parser.parse_args(argv)
    # Each variant is its own tf.function around the same Python step, which TensorFlow's
    # retracing warning counts as retracing: expected here, so keep it out of the tables.
    tf.get_logger().setLevel("ERROR")
    if args.repeats is None:
        args.repeats = 5 if args.quick else 25
    args.warmup = 2 if args.quick else 5
    args.min_sample = 0.02 if args.quick else 0.1

    print(
        f"bn_step: TensorFlow {tf.__version__}, Keras {keras.__version__}, kerasbn "
        f"{kerasbn.__version__}; {len(os.sched_getaffinity(0))} CPU cores; "
        f"{args.repeats} interleaved samples per variant, medians"
        + ("  [--quick: noisy]" if args.quick else "")
    )
    print(
        "  '+jit': the whole step is a tf.function(jit_compile=True); otherwise a plain "
        "tf.function (kerasbn's own\n  kernel is XLA-compiled in both). Columns: median wall "
        "time per step; IQR/median; process CPU time\n  per step (all threads: CPU > wall means "
        "several cores worked); time / floor; time / kerasbn's time\n  in the same jit "
        "setting (> 1: kerasbn is faster)."
    )
    for label, shape in SHAPES.items():
        if args.shapes is None or shape_key(shape) in args.shapes:
            run_shape(label, shape, args)
    return 0


def shape_key(shape):
    return "x".join(map(str, shape))


if __name__ == "__main__":
    sys.exit(main())
