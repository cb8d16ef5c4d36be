"""Training throughput of one small ResNet-style convnet with kerasbn vs Keras batch norm.

The same network, the same initial weights and the same synthetic batch, differing only in the
batch-normalization class: `kerasbn.BatchNormalization` or `keras.layers.BatchNormalization`,
each compiled with and without `jit_compile`. A step is one `model.train_on_batch` call
(forward, backward, SGD update and the BN statistics update); the four models are timed
round-robin and compared by their median step time. Target: kerasbn at least 1.25× the Keras-BN
model's steps per second under the same `jit_compile` setting.

    .venv/bin/python benchmarks/model_step.py            # the recorded run (quiet machine please)
    .venv/bin/python benchmarks/model_step.py --quick    # a smoke run: few repeats, noisy
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

INPUT_SHAPE = (32, 32, 3)
CLASSES = 10
STAGES = (16, 32, 64)  # channels per stage; every stage after the first halves H and W
TARGET = 1.25
BATCH_NORMS = {"kerasbn": kerasbn.BatchNormalization, "keras": keras.layers.BatchNormalization}


def residual_block(x, channels, stride, batch_norm):
    """conv-BN-ReLU-conv-BN plus a shortcut (1×1 conv + BN when the shape changes), then ReLU."""
    shortcut = x
    y = keras.layers.Conv2D(channels, 3, strides=stride, padding="same", use_bias=False)(x)
    y = keras.layers.ReLU()(batch_norm()(y))
    y = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)(y)
    y = batch_norm()(y)
    if stride != 1 or x.shape[-1] != channels:
        shortcut = keras.layers.Conv2D(channels, 1, strides=stride, use_bias=False)(x)
        shortcut = batch_norm()(shortcut)
    return keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))


def build_model(batch_norm, *, blocks_per_stage, jit_compile, seed=0):
    """The network, compiled; the same seed gives the same initial weights for either BN."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(INPUT_SHAPE)
    x = keras.layers.Conv2D(STAGES[0], 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(batch_norm()(x))
    for stage, channels in enumerate(STAGES):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            x = residual_block(x, channels, stride, batch_norm)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(CLASSES)(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def synthetic_batch(batch_size, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(0.0, 1.0, (batch_size, *INPUT_SHAPE)).astype(np.float32)
    labels = rng.integers(0, CLASSES, batch_size).astype(np.int32)
    return tf.constant(images), tf.constant(labels)


def main(argv=None):
    parser = _timing.benchmark_parser(
        __doc__.split("\n\n")[0], default_repeats=20, unit="model"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    parser.add_argument("--blocks", type=int, default=1, help="residual blocks per stage")
    args = parser.parse_args(argv)
    # Each variant is its own tf.function around the same Python step, which TensorFlow's
    # retracing warning counts as retracing: expected here, so keep it out of the tables.
    tf.get_logger().setLevel("ERROR")
    repeats = args.repeats or (5 if args.quick else 20)
    warmup = 2 if args.quick else 5
    min_sample = 0.2 if args.quick else 1.0

    images, labels = synthetic_batch(args.batch_size)
    models = {}
    for jit in (False, True):
        for name, batch_norm in BATCH_NORMS.items():
            label = f"{name}{' +jit' if jit else ''}"
            models[label] = build_model(batch_norm, blocks_per_stage=args.blocks, jit_compile=jit)
    example = next(iter(models.values()))
    bn_layers = sum(type(layer).__name__ == "BatchNormalization" for layer in example.layers)

    print(
        f"model_step: TensorFlow {tf.__version__}, Keras {keras.__version__}, kerasbn "
        f"{kerasbn.__version__}; {len(os.sched_getaffinity(0))} CPU cores"
        + ("  [--quick: noisy]" if args.quick else "")
    )
    print(
        f"  ResNet-style convnet: input {INPUT_SHAPE}, stages {STAGES} × {args.blocks} "
        f"block(s), {bn_layers} BN layers, {example.count_params():,} parameters;\n"
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
        ratio = times[f"keras{suffix}"].median / times[f"kerasbn{suffix}"].median
        print(f"    {_timing.pass_fail(ratio >= TARGET)}  {setting}: {ratio:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
