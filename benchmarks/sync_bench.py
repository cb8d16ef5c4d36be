"""The cost of synchronized batch statistics: a training step under MirroredStrategy on 2 CPUs.

One step of a small conv model (two conv → BN → ReLU blocks, pooling, a dense head) on a global
batch split over two logical CPU devices: forward, loss, gradients, and an SGD update that
all-reduces the gradients, as `model.fit` does. The variants differ only in their BN layers:

    kerasbn               kerasbn.BatchNormalization(synchronized=False): per-replica statistics
    kerasbn sync          synchronized=True: 2 collectives per BN forward, 1 per BN backward
    keras                 keras.layers.BatchNormalization(synchronized=False)
    keras sync            keras.layers.BatchNormalization(synchronized=True): 3 collectives per
                          BN forward (Σx, Σx², count; E[x²] − E[x]², unstable for |μ| ≫ σ)

Printed: interleaved medians (wall clock, and CPU time of all threads, steadier on a shared
machine), and the ratio "sync / not sync", the price of synchronization, with its cost per BN
layer. Two logical devices share this machine's cores, so the collectives
are memory copies and thread hand-offs: the figure is the latency overhead of the extra
collectives, not a network's.

    .venv/bin/python benchmarks/sync_bench.py            # the recorded run (quiet machine please)
    .venv/bin/python benchmarks/sync_bench.py --quick    # a smoke run: few repeats, noisy
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

REPLICAS = 2
GLOBAL_BATCH = 32
IMAGE = (16, 16, 3)
CHANNELS = 32
CLASSES = 10
BN_LAYERS = 2

VARIANTS = {
    "kerasbn": lambda: kerasbn.BatchNormalization(synchronized=False),
    "kerasbn sync": lambda: kerasbn.BatchNormalization(synchronized=True),
    "keras": lambda: keras.layers.BatchNormalization(synchronized=False),
    "keras sync": lambda: keras.layers.BatchNormalization(synchronized=True),
}


def conv_model(make_bn):
    layers = [keras.Input(IMAGE)]
    for _ in range(BN_LAYERS):
        layers += [
            keras.layers.Conv2D(CHANNELS, 3, padding="same", use_bias=False),
            make_bn(),
            keras.layers.ReLU(),
        ]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(CLASSES)]
    return keras.Sequential(layers)


def training_step(strategy, make_bn):
    """A tf.function running one distributed training step, as `model.fit`'s step does."""
    keras.utils.set_random_seed(0)  # the same conv and dense weights in every variant
    with strategy.scope():
        model = conv_model(make_bn)
        optimizer = keras.optimizers.SGD(0.01)
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum"
    )

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            # Σ over the replica's rows / global batch: the replicas' gradients add to the mean's.
            loss = loss_fn(y, logits) / GLOBAL_BATCH
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    @tf.function
    def step(x, y):
        return strategy.reduce("SUM", strategy.run(replica_step, args=(x, y)), axis=None)

    return step


def main(argv=None):
    parser = _timing.benchmark_parser(__doc__.split("\n\n")[0], default_repeats=25)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 25
    warmup = 2 if args.quick else 5
    min_sample = 0.05 if args.quick else 0.2

    # Before anything initializes the TensorFlow runtime (importing kerasbn does not).
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * REPLICAS
    )
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(REPLICAS)])

    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, (GLOBAL_BATCH, *IMAGE)).astype(np.float32)
    y = rng.integers(0, CLASSES, GLOBAL_BATCH)
    per_replica = GLOBAL_BATCH // REPLICAS

    def distribute(array):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(
                array[ctx.replica_id_in_sync_group * per_replica:][:per_replica]
            )
        )

    xs, ys = distribute(x), distribute(y)
    steps = {name: training_step(strategy, make_bn) for name, make_bn in VARIANTS.items()}

    print(
        f"sync_bench: TensorFlow {tf.__version__}, Keras {keras.__version__}, kerasbn "
        f"{kerasbn.__version__}; {len(os.sched_getaffinity(0))} CPU cores shared by "
        f"{REPLICAS} logical devices under MirroredStrategy; {args.repeats} interleaved "
        "samples per variant, medians" + ("  [--quick: noisy]" if args.quick else "")
    )
    print(
        f"  step: {BN_LAYERS}× (conv {CHANNELS} → BN → ReLU), pool, dense; global batch "
        f"{GLOBAL_BATCH} of {IMAGE} ({per_replica} per replica); forward, backward, SGD"
    )
    timed = {name: (lambda s=step: s(xs, ys)) for name, step in steps.items()}
    times = _timing.interleaved_times(
        timed, repeats=args.repeats, warmup=warmup, min_sample_seconds=min_sample
    )
    wall = {name: samples.median for name, samples in times.items()}
    cpu = {name: samples.cpu_median for name, samples in times.items()}
    print(f"\n  {'variant':<16}{'median':>12}{'IQR':>6}{'CPU':>13}")
    for name, samples in times.items():
        print(
            f"  {name:<16}{_timing.format_ms(wall[name])}{samples.spread:>6.0%}"
            f"{_timing.format_ms(cpu[name])}"
        )
    # Wall clock is the figure; CPU time (all threads) is steadier on a shared machine.
    print("\n  price of synchronization (sync / not sync, same implementation):")
    for base in ("kerasbn", "keras"):
        synced = f"{base} sync"
        extra = (wall[synced] - wall[base]) / BN_LAYERS
        print(
            f"    {base:<10}{wall[synced] / wall[base]:6.2f}× wall ({extra * 1e3:+.3f} ms per BN "
            f"layer per step), {cpu[synced] / cpu[base]:.2f}× CPU"
        )
    print(
        f"  kerasbn sync / keras sync: {wall['kerasbn sync'] / wall['keras sync']:.2f}× wall, "
        f"{cpu['kerasbn sync'] / cpu['keras sync']:.2f}× CPU"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
