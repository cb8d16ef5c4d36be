"""Training throughput of one small ResNet-style convnet with kerasbn vs Keras batch norm.

The same network, the same initial weights and the same synthetic batch, differing only in how
batch normalization and the ReLU after it are written:

    kerasbn relu   kerasbn.BatchNormalization(activation="relu") (BN→ReLU fused in the kernel)
    kerasbn        kerasbn.BatchNormalization, then keras.layers.ReLU
    keras          keras.layers.BatchNormalization, then keras.layers.ReLU
    no BN          keras.layers.Identity where the BN layers are (the ReLUs kept): no BN at all

each compiled with and without `jit_compile`. (A BN whose output is added to the shortcut before
the ReLU has nothing to fuse: there every variant uses its plain BN.) A step is one
`model.train_on_batch` call (forward, backward, SGD update and the BN statistics update); the
models are timed round-robin and compared by their median step time. Target: kerasbn at least
1.25× the Keras-BN model's steps per second under the same `jit_compile` setting. The model
without BN bounds what any BN could reach: no BN costs less than none, so no implementation of
BN can make the step faster than the Keras-BN model's step ÷ the no-BN model's.

    .venv/bin/python benchmarks/model_step.py            # the recorded run (quiet machine please)
    .venv/bin/python benchmarks/model_step.py --quick    # a smoke run: few repeats, noisy
    .venv/bin/python benchmarks/model_step.py --blocks 2 --input-size 64   # deeper, larger
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

CLASSES = 10
STAGES = (16, 32, 64)  # channels per stage; every stage after the first halves H and W
TARGET = 1.25


def _then_relu(batch_norm):
    def bn_relu(x):
        return keras.layers.ReLU()(batch_norm()(x))

    return bn_relu


def _fused_relu(x):
    return kerasbn.BatchNormalization(activation="relu")(x)


# name: (plain BN, BN followed by ReLU)
VARIANTS = {
    "kerasbn relu": (kerasbn.BatchNormalization, _fused_relu),
    "kerasbn": (kerasbn.BatchNormalization, _then_relu(kerasbn.BatchNormalization)),
    "keras": (keras.layers.BatchNormalization, _then_relu(keras.layers.BatchNormalization)),
    "no BN": (keras.layers.Identity, _then_relu(keras.layers.Identity)),
}


def residual_block(x, channels, stride, batch_norm, bn_relu):
    """conv-BN-ReLU-conv-BN plus a shortcut (1×1 conv + BN when the shape changes), then ReLU."""
    shortcut = x
    y = keras.layers.Conv2D(channels, 3, strides=stride, padding="same", use_bias=False)(x)
    y = bn_relu(y)
    y = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)(y)
    y = batch_norm()(y)
    if stride != 1 or x.shape[-1] != channels:
        shortcut = keras.layers.Conv2D(channels, 1, strides=stride, use_bias=False)(x)
        shortcut = batch_norm()(shortcut)
    return keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))


def build_model(variant, *, input_size, blocks_per_stage, jit_compile, seed=0):
    """The network, compiled; the same seed gives the same initial weights for every variant."""
    batch_norm, bn_relu = VARIANTS[variant]
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_size, input_size, 3))
    x = keras.layers.Conv2D(STAGES[0], 3, padding="same", use_bias=False)(inputs)
    x = bn_relu(x)
    for stage, channels in enumerate(STAGES):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            x = residual_block(x, channels, stride, batch_norm, bn_relu)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(CLASSES)(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def synthetic_batch(batch_size, input_size, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(0.0, 1.0, (batch_size, input_size, input_size, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, batch_size).astype(np.int32)
    return tf.constant(images), tf.constant(labels)


def main(argv=None):
    parser = _timing.benchmark_parser(
        __doc__.split("\n\n")[0], default_repeats=20, unit="model"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    parser.add_argument("--blocks", type=int, default=1, help="residual blocks per stage")
    parser.add_argument("--input-size", type=int, default=32, help="H = W of the input images")
    args = parser.parse_args(argv)
    # Each variant is its own tf.function around the same Python step, which TensorFlow's
    # retracing warning counts as retracing: expected here, so keep it out of the tables.
    tf.get_logger().setLevel("ERROR")
    repeats = args.repeats or (5 if args.quick else 20)
    warmup = 2 if args.quick else 5
    min_sample = 0.2 if args.quick else 1.0

    images, labels = synthetic_batch(args.batch_size, args.input_size)
    models = {}
    for jit in (False, True):
        for name in VARIANTS:
            label = f"{name}{' +jit' if jit else ''}"
            models[label] = build_model(
                name, input_size=args.input_size, blocks_per_stage=args.blocks, jit_compile=jit
            )
    example = models["keras"]
    bn_layers = sum(type(layer).__name__ == "BatchNormalization" for layer in example.layers)
    fused = sum(
        getattr(layer, "_fused_activation", None) is not None
        for layer in models["kerasbn relu"].layers
    )

    print(
        f"model_step: TensorFlow {tf.__version__}, Keras {keras.__version__}, kerasbn "
        f"{kerasbn.__version__}; {len(os.sched_getaffinity(0))} CPU cores"
        + ("  [--quick: noisy]" if args.quick else "")
    )
    print(
        f"  ResNet-style convnet: input ({args.input_size}, {args.input_size}, 3), stages "
        f"{STAGES} × {args.blocks} block(s), {bn_layers} BN layers ({fused} followed by a ReLU "
        f"that 'kerasbn relu' fuses), {example.count_params():,} parameters;\n"
        f"  batch {args.batch_size}, model.train_on_batch with SGD(momentum), "
        f"{repeats} interleaved samples per model, medians"
    )

    steps = {
        label: (lambda m=model: m.train_on_batch(images, labels)) for label, model in models.items()
    }
    times = _timing.interleaved_times(steps, repeats=repeats, warmup=warmup,
                                      min_sample_seconds=min_sample)

    print(f"\n  {'model':<16}{'step':>12}{'IQR':>7}{'CPU/step':>12}{'steps/s':>10}")
    for label, samples in times.items():
        print(
            f"  {label:<16}{_timing.format_ms(samples.median)}{samples.spread:>6.0%}"
            f"{_timing.format_ms(samples.cpu_median)}{1 / samples.median:>10.1f}"
        )
    print(f"\n  target (informational): kerasbn ≥{TARGET}× the Keras-BN model's steps/s")
    for suffix, setting in (("", "jit_compile=False"), (" +jit", "jit_compile=True")):
        bound = times[f"keras{suffix}"].median / times[f"no BN{suffix}"].median
        print(f"    bound  {setting}, no BN at all: {bound:.2f}×  (what any BN could reach)")
        for ours in ("kerasbn relu", "kerasbn"):
            ratio = times[f"keras{suffix}"].median / times[f"{ours}{suffix}"].median
            cpu = times[f"keras{suffix}"].cpu_median / times[f"{ours}{suffix}"].cpu_median
            print(
                f"    {_timing.pass_fail(ratio >= TARGET)}  {setting}, {ours:<12}: "
                f"{ratio:.2f}×  (CPU time {cpu:.2f}×)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
