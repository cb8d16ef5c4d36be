"""Time one `kerasbn.population_statistics` pass against `model.predict` on the same data.

The issue's target: the pass costs about one forward pass, at most 1.3× `model.predict`.
Both sides get the same NumPy arrays and batch size. predict feeds them through Keras's data
adapter (a tf.data pipeline) and gathers and concatenates its outputs; the pass slices the arrays
in place (each batch a view) and updates its accumulators. Every BN layer's moments in the pass
come from kerasbn's kernel (`kernel.batch_norm_forward`), Keras's layers included.

Models (CPU, float32, not compiled, so neither side uses XLA, as Keras on CPU does not):
    conv   Conv-BN-ReLU ×2, pool, Conv-BN-ReLU, global pool, Dense-BN: 4 BN layers
    dense  (Dense-BN-ReLU) ×3 on 256 features: 3 BN layers
each once with `kerasbn.BatchNormalization` and once with `keras.layers.BatchNormalization`.

Both are warmed up first (tracing happens there: the pass reuses its traced step per model, as
predict reuses its predict function), then timed round-robin and compared by wall-clock medians
(the ratio that counts); the CPU-time ratio is printed too, steadier on a shared machine.

    .venv/bin/python benchmarks/population_bench.py            # the recorded run (quiet machine)
    .venv/bin/python benchmarks/population_bench.py --quick    # a smoke run: few repeats, noisy
"""

from __future__ import annotations

import kerasbn_programs

kerasbn_programs.quiet_tensorflow_import()  # before anything imports TensorFlow

import argparse
import os
import sys

import keras
import numpy as np
import tensorflow as tf

import kerasbn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # a sibling file, not an installed module

TARGET_RATIO = 1.3
BATCH_SIZE = 64
BN_CLASSES = {"kerasbn": kerasbn.BatchNormalization, "keras": keras.layers.BatchNormalization}


def conv_model(bn):
    x = inputs = keras.Input((32, 32, 3))
    for filters, pool in ((32, False), (32, True), (64, False)):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.ReLU()(bn()(x))
        if pool:
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, bn()(keras.layers.Dense(10)(x)))


def dense_model(bn):
    x = inputs = keras.Input((256,))
    for _ in range(3):
        x = keras.layers.ReLU()(bn()(keras.layers.Dense(512, use_bias=False)(x)))
    return keras.Model(inputs, keras.layers.Dense(10)(x))


MODELS = {"conv (N,32,32,3)": (conv_model, (32, 32, 3)), "dense (N,256)": (dense_model, (256,))}


def bench(label, model, x, args):
    """Prints the ratio on arrays (the target) and, on one line below, the same pair fed from
    one `tf.data.Dataset`: both sides then read the same pipeline, so that ratio is the price
    of the statistics themselves, without the difference in how the two slice arrays."""
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(BATCH_SIZE)
    variants = {
        "predict": lambda: model.predict(x, batch_size=BATCH_SIZE, verbose=0),
        "population_statistics": lambda: kerasbn.population_statistics(
            model, x, batch_size=BATCH_SIZE, verbose=0
        ),
        "predict, tf.data": lambda: model.predict(dataset, verbose=0),
        "population_statistics, tf.data": lambda: kerasbn.population_statistics(
            model, dataset, verbose=0
        ),
    }
    times = _timing.interleaved_times(
        variants, repeats=args.repeats, warmup=args.warmup, min_sample_seconds=args.min_sample
    )
    predict, pass_, predict_dataset, pass_dataset = (times[name] for name in variants)
    ratio = pass_.median / predict.median
    print(f"  {label:<28}{_timing.format_ms(predict.median)}{_timing.format_ms(pass_.median)}"
          f"{ratio:>8.2f}×  {_timing.pass_fail(ratio <= TARGET_RATIO)}"
          f"   cpu {pass_.cpu_median / predict.cpu_median:.2f}×"
          f"   IQR {predict.spread:.0%} / {pass_.spread:.0%}")
    print(f"  {'  same, both from tf.data':<28}{_timing.format_ms(predict_dataset.median)}"
          f"{_timing.format_ms(pass_dataset.median)}"
          f"{pass_dataset.median / predict_dataset.median:>8.2f}×"
          f"   cpu {pass_dataset.cpu_median / predict_dataset.cpu_median:.2f}×"
          f"   IQR {predict_dataset.spread:.0%} / {pass_dataset.spread:.0%}")
    return ratio


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller data, few repeats: noisy")
    parser.add_argument("--repeats", type=int, default=None,
                        help="samples per variant for the medians (default 15, --quick 5)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 15
    args.warmup = 2 if args.quick else 3
    args.min_sample = 0.0  # one call per sample: a call is already many batches long
    samples = 512 if args.quick else 4096
    print(f"population_statistics vs model.predict: {samples} samples, batch {BATCH_SIZE}, "
          f"medians of {args.repeats} interleaved repeats, CPU float32"
          + ("  [--quick: noisy]" if args.quick else ""))
    print(f"  {'model':<28}{'predict':>12}{'pass':>12}{'ratio':>9}  target <= {TARGET_RATIO}×")
    rng = np.random.default_rng(0)
    ratios = []
    for name, (build, shape) in MODELS.items():
        x = rng.normal(size=(samples, *shape)).astype("float32")
        for bn_name, bn in BN_CLASSES.items():
            keras.utils.set_random_seed(0)
            ratios.append(bench(f"{name}, {bn_name}", build(bn), x, args))
    print(f"  worst ratio {max(ratios):.2f}× (target <= {TARGET_RATIO}×)")


if __name__ == "__main__":
    main()
