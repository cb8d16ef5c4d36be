"""The distributed half of tests/test_sync.py, run in fresh processes.

Why a separate process. Logical CPU devices must be configured before TensorFlow initializes
its runtime, which any earlier test in a pytest process has done; and a
MultiWorkerMirroredStrategy worker is one process per worker. So the tests start this module,
it writes what the replicas computed to an .npz file, and the test process compares that with
the single-device layer and the float64 reference on the concatenated batch.

    python -m tests.sync_worker mirrored OUT.npz      # MirroredStrategy on 2 and 4 CPU devices
    python -m tests.sync_worker multiworker OUT.npz   # one worker of MultiWorkerMirroredStrategy;
                                                      # TF_CONFIG names the cluster and the task

The cases and the model are defined here, once, for both sides.
"""

from __future__ import annotations

import kerasbn_programs

kerasbn_programs.quiet_tensorflow_import()  # before anything imports TensorFlow

import dataclasses
import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf

import kerasbn

# One tf.function per case is the point here, not an accident: no retracing warnings.
tf.get_logger().setLevel("ERROR")

MIRRORED_REPLICAS = (2, 4)
MOMENTUM = 0.5  # far from 1, so one update moves the statistics visibly
FIT_BATCH = 8
FIT_STEPS = 2
# Every collective and every process is bounded: a lost peer fails the test instead of hanging.
COLLECTIVE_TIMEOUT_SECONDS = 120


@dataclasses.dataclass(frozen=True)
class Case:
    """One training-mode call, split over the replicas along the batch axis."""

    shape: tuple[int, ...]
    axis: int = -1
    location: float = 0.0  # channel c has mean location + c
    scale: float = 1.0
    statistics: str = "moving_average"
    masked: bool = False  # a (batch, time) mask on a rank-3 input; the last 3 rows all masked
    empty_last_replica: bool = False  # the last replica gets no rows (a final partial batch)
    even_split: bool = False  # equal shares (else unequal on purpose)
    activation: str | None = None  # applied after the synchronized kernel

    def layer_kwargs(self, synchronized=True):
        return {
            "axis": self.axis, "momentum": MOMENTUM, "statistics": self.statistics,
            "synchronized": synchronized, "activation": self.activation,
        }

    def inputs(self, seed):
        """x, the upstream gradient dy, the mask (or None), gamma and beta, as float32."""
        rng = np.random.default_rng(seed)
        channels = self.shape[self.axis]
        per_channel = [1] * len(self.shape)
        per_channel[self.axis] = channels
        means = (self.location + np.arange(channels)).reshape(per_channel)
        x = (means + self.scale * rng.standard_normal(self.shape)).astype(np.float32)
        dy = rng.standard_normal(self.shape).astype(np.float32)
        mask = None
        if self.masked:
            mask = rng.random(self.shape[:2]) < 0.7
            mask[-3:] = False  # so the last of four replicas gets an entirely masked share
            mask[0, 0] = True
        gamma = (1.0 + 0.5 * rng.standard_normal(channels)).astype(np.float32)
        beta = rng.standard_normal(channels).astype(np.float32)
        return x, dy, mask, gamma, beta

    def split_sizes(self, replicas):
        """Rows per replica: unequal unless `even_split`; with `empty_last_replica` one is 0."""
        n = self.shape[0]
        if self.even_split:
            sizes = [n // replicas] * replicas
        elif self.empty_last_replica:
            sizes = [len(a) for a in np.array_split(np.arange(n), replicas - 1)] + [0]
        else:
            sizes = [len(a) for a in np.array_split(np.arange(n), replicas)]
            sizes[0] -= 1
            sizes[-1] += 1
        assert sum(sizes) == n and min(sizes) >= 0, sizes
        return sizes


CASES = {
    "dense": Case((12, 6)),
    "conv_large_mean": Case((8, 3, 3, 5), location=1e4, scale=0.1),
    "channels_first_population": Case((8, 4, 3, 2), axis=1, statistics="population"),
    "masked": Case((8, 5, 3), masked=True),
    "empty_replica": Case((9, 4), location=3.0, empty_last_replica=True),
    # One row per replica: m = 1 locally, which only a synchronized layer may accept.
    "one_row_per_replica": Case((2, 3), location=-2.0, even_split=True),
    "masked_relu": Case((8, 5, 3), masked=True, activation="relu"),
}
# Every case on two replicas; on four, the cases four make harder (an entirely masked share),
# since each replica device compiles its stages for its own share's shape.
MIRRORED_GRID = [(name, 2) for name in CASES] + [("conv_large_mean", 4), ("masked", 4)]
MULTIWORKER_CASES = ("conv_large_mean", "masked")


def case_seed(name):
    return sorted(CASES).index(name)


def result_key(case, replicas, field):
    return f"{case}__{replicas}__{field}"


# --- one training-mode call under a strategy --------------------------------------------------


def _per_replica(strategy, array, sizes):
    bounds = np.cumsum([0] + sizes)

    def value(context):
        r = context.replica_id_in_sync_group
        return tf.constant(array[bounds[r]:bounds[r + 1]])

    return strategy.experimental_distribute_values_from_function(value)


def run_case(strategy, name, synchronized=True):
    """What the replicas this process holds computed, as NumPy arrays keyed by field.

    y and dx: the local replicas' rows, in replica order. dgamma, dbeta and every statistic:
    one row per local replica (the test sums the gradients, and checks that all replicas store
    the same statistics).
    """
    case = CASES[name]
    x, dy, mask, gamma, beta = case.inputs(case_seed(name))
    sizes = case.split_sizes(strategy.num_replicas_in_sync)
    with strategy.scope():
        layer = kerasbn.BatchNormalization(**case.layer_kwargs(synchronized))
        layer.build((None,) + case.shape[1:])
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)

    def replica_step(x, dy, *mask):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=mask[0] if mask else None)
        dx, dgamma, dbeta = tape.gradient(y, [x, layer.gamma, layer.beta], output_gradients=dy)
        return y, dx, dgamma, dbeta

    args = [_per_replica(strategy, a, sizes) for a in (x, dy)]
    if mask is not None:
        args.append(_per_replica(strategy, mask, sizes))
    step = tf.function(lambda *args: strategy.run(replica_step, args=args))
    y, dx, dgamma, dbeta = step(*args)

    def local(value):
        return [t.numpy() for t in strategy.experimental_local_results(value)]

    results = {
        "y": np.concatenate(local(y)),
        "dx": np.concatenate(local(dx)),
        "dgamma": np.stack(local(dgamma)),
        "dbeta": np.stack(local(dbeta)),
    }
    statistics = ["moving_mean", "moving_variance", "skipped_updates"]
    if case.statistics == "population":
        statistics += ["population_count", "population_dof"]
    for field in statistics:
        results[field] = np.stack(local(getattr(layer, field).value))
    return results


# --- model.fit -------------------------------------------------------------------------------


def small_conv_model(synchronized):
    return keras.Sequential([
        keras.Input((6, 6, 3)),
        keras.layers.Conv2D(4, 3, padding="same"),
        kerasbn.BatchNormalization(synchronized=synchronized, momentum=MOMENTUM),
        keras.layers.ReLU(),
        keras.layers.Conv2D(4, 3, padding="same", use_bias=False),
        kerasbn.BatchNormalization(synchronized=synchronized, momentum=MOMENTUM),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2),
    ])


def fit_data():
    rng = np.random.default_rng(100)
    x = rng.standard_normal((FIT_BATCH * FIT_STEPS, 6, 6, 3)).astype(np.float32)
    y = rng.standard_normal((FIT_BATCH * FIT_STEPS, 2)).astype(np.float32)
    return x, y


def fit(model, *, jit_compile, initial_weights=None):
    """`model.fit` for FIT_STEPS steps of plain SGD on `fit_data()`; returns the weights."""
    if initial_weights is not None:
        model.set_weights(initial_weights)
    model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=jit_compile)
    x, y = fit_data()
    model.fit(x, y, batch_size=FIT_BATCH, epochs=1, shuffle=False, verbose=0)
    return model.get_weights()


def run_fit(strategy, jit_compile):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = small_conv_model(synchronized=True)
    initial = [np.copy(w) for w in model.get_weights()]
    final = fit(model, jit_compile=jit_compile)
    return {
        **{f"initial_{i}": w for i, w in enumerate(initial)},
        **{f"final_{i}": w for i, w in enumerate(final)},
    }


def run_population_statistics(strategy):
    """`kerasbn.population_statistics` called in the strategy's scope on a synchronized model.

    The pass runs the model on whole batches (it does not split them over replicas), so its
    statistics are the global batch's, as with one device; every replica must store them.
    """
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = small_conv_model(synchronized=True)
        initial = [np.copy(w) for w in model.get_weights()]
        kerasbn.population_statistics(model, fit_data()[0], batch_size=FIT_BATCH, verbose=0)
    results = {f"initial_{i}": w for i, w in enumerate(initial)}
    layers = [layer for layer in model.layers if isinstance(layer, kerasbn.BatchNormalization)]
    for i, layer in enumerate(layers):
        for field in ("moving_mean", "moving_variance"):
            local = strategy.experimental_local_results(getattr(layer, field).value)
            results[f"bn{i}_{field}"] = np.stack([t.numpy() for t in local])
    return results


# --- entry points ----------------------------------------------------------------------------


def _prefixed(prefix, results):
    return {f"{prefix}__{k}": v for k, v in results.items()}


def _mirrored_strategy(replicas):
    # Every MirroredStrategy numbers its collective groups from the same start, so a second
    # strategy over other devices would join the first one's group and abort. TensorFlow's own
    # tests give each strategy its own range through this attribute ("only set this in tests").
    tf.distribute.MirroredStrategy._collective_key_base = 10_000 * replicas
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])


def run_mirrored(out):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * max(MIRRORED_REPLICAS)
    )
    results = {}
    for replicas in MIRRORED_REPLICAS:
        strategy = _mirrored_strategy(replicas)
        for name in [name for name, r in MIRRORED_GRID if r == replicas]:
            for field, value in run_case(strategy, name).items():
                results[result_key(name, replicas, field)] = value
        if replicas == 2:
            results.update(_prefixed("fit", run_fit(strategy, jit_compile=False)))
            results.update(_prefixed("population", run_population_statistics(strategy)))
            unsynchronized = run_case(strategy, "dense", synchronized=False)
            results.update(_prefixed("unsynchronized", unsynchronized))
    # XLA around a step that spans several devices is refused by TensorFlow for any model, so
    # jit_compile=True is checked where it can run: one replica, where synchronized=True must
    # take the fused path.
    one_replica = run_fit(_mirrored_strategy(1), jit_compile=True)
    results.update(_prefixed("fit_jit_one_replica", one_replica))
    np.savez(out, **results)


def run_multiworker(out):
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS
    )
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    replicas = strategy.num_replicas_in_sync
    results = {}
    for name in MULTIWORKER_CASES:
        for field, value in run_case(strategy, name).items():
            results[result_key(name, replicas, field)] = value
    results["task_index"] = np.array(json.loads(os.environ["TF_CONFIG"])["task"]["index"])
    np.savez(out, **results)


if __name__ == "__main__":
    mode, out = sys.argv[1:]
    {"mirrored": run_mirrored, "multiworker": run_multiworker}[mode](out)
