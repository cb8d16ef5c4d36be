"""`synchronized=True`: batch statistics over the global batch of all replicas.

The invariant: a training-mode call split over R replicas gives what one device gives on the
concatenated batch, for the outputs, ∂ℓ/∂x, the summed ∂ℓ/∂γ and ∂ℓ/∂β, and the statistics
every replica stores. The replicas run in fresh processes (see tests/sync_worker.py): two and
four logical CPU devices under MirroredStrategy, and two MultiWorkerMirroredStrategy workers on
127.0.0.1. This process computes the single-device layer and the float64 reference.
"""

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from kerasbn import _sync, kernel
from tests import reference, sync_worker
from tests.sync_worker import CASES, MIRRORED_GRID, MULTIWORKER_CASES

REPO = Path(__file__).resolve().parent.parent
# Generous for a loaded 2-core machine (a run takes ~30 s on a quiet one); the bound is there to
# turn a hang into a failure, not to measure speed.
PROCESS_TIMEOUT_SECONDS = 300
MULTIWORKER_REPLICAS = 2


# --- running the workers ---------------------------------------------------------------------


def _worker_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    # Loopback only: no proxy may sit between the workers.
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _run_workers(commands, logs_dir):
    """Runs (argv, env) pairs concurrently; every one ends, or is killed, before this returns."""
    processes, logs = [], []
    try:
        for i, (argv, env) in enumerate(commands):
            log = open(logs_dir / f"worker{i}.log", "w+")  # noqa: SIM115 (closed in finally)
            logs.append(log)
            processes.append(
                subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
        for process in processes:
            process.wait(timeout=PROCESS_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a sync worker ran over {PROCESS_TIMEOUT_SECONDS} s; logs in {logs_dir}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
    for i, process in enumerate(processes):
        if process.returncode != 0:
            tail = (logs_dir / f"worker{i}.log").read_text()[-4000:]
            pytest.fail(f"sync worker {i} exited with {process.returncode}:\n{tail}")


def _free_loopback_ports(count):
    """Ports the OS reports free on 127.0.0.1 (all held open together, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _worker_argv(mode, out):
    return [sys.executable, "-m", "tests.sync_worker", mode, str(out)]


def _multiworker_commands(directory):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_loopback_ports(MULTIWORKER_REPLICAS)]}
    return [
        (
            _worker_argv("multiworker", directory / f"worker{i}.npz"),
            _worker_env(TF_CONFIG=json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": i}}
            )),
        )
        for i in range(MULTIWORKER_REPLICAS)
    ]


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    """Both worker kinds, started together: their start-up (importing TensorFlow, the gRPC
    handshake) overlaps instead of adding up."""
    directory = tmp_path_factory.mktemp("sync_workers")
    commands = [(_worker_argv("mirrored", directory / "mirrored.npz"), _worker_env())]
    commands += _multiworker_commands(directory)
    _run_workers(commands, directory)
    return directory


@pytest.fixture(scope="module")
def mirrored(distributed_runs):
    with np.load(distributed_runs / "mirrored.npz") as results:
        return dict(results)


@pytest.fixture(scope="module")
def multiworker(distributed_runs):
    # Worker i holds replica i: concatenating the workers' rows in task order restores the batch.
    per_worker = []
    for i in range(MULTIWORKER_REPLICAS):
        with np.load(distributed_runs / f"worker{i}.npz") as results:
            assert int(results["task_index"]) == i
            per_worker.append(dict(results))
    return {
        key: np.concatenate([w[key] for w in per_worker])
        for key in per_worker[0]
        if key != "task_index"
    }


# --- the single-device side ------------------------------------------------------------------


def _weights(mask):
    """The mask as reference weights: (batch, time) → (batch, time, 1)."""
    return None if mask is None else mask[..., None].astype(np.float64)


def run_without_strategy(name, synchronized):
    """One training-mode call of the case on the whole batch, outside any strategy: every
    output, gradient and statistic as NumPy arrays keyed by field."""
    case = CASES[name]
    x, dy, mask, gamma, beta = case.inputs(sync_worker.case_seed(name))
    layer = kerasbn.BatchNormalization(**case.layer_kwargs(synchronized=synchronized))
    layer.build((None,) + case.shape[1:])
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    x_t = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x_t)
        y = layer(x_t, training=True, mask=None if mask is None else tf.constant(mask))
    dx, dgamma, dbeta = tape.gradient(
        y, [x_t, layer.gamma, layer.beta], output_gradients=tf.constant(dy)
    )
    results = {"y": y, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}
    for field in ("moving_mean", "moving_variance", "skipped_updates", "population_count",
                  "population_dof"):
        if getattr(layer, field) is not None:
            results[field] = getattr(layer, field)
    return {k: np.asarray(v) for k, v in results.items()}


@functools.cache
def single_device(name):
    """The unsynchronized layer on the whole batch: outputs, gradients and statistics."""
    return run_without_strategy(name, synchronized=False)


def float64_reference(name):
    """(y, dx, dγ, dβ) of the paper's formulas in float64 on the whole batch."""
    case = CASES[name]
    x, dy, mask, gamma, beta = case.inputs(sync_worker.case_seed(name))
    axes = (case.axis % len(case.shape),)
    epsilon = kerasbn.BatchNormalization().epsilon
    if case.activation is None:
        y = reference.forward(x, gamma, beta, axes, epsilon, _weights(mask))[0]
        dx, dgamma, dbeta = reference.backward(x, gamma, dy, axes, epsilon, _weights(mask))
    else:
        y, dx, dgamma, dbeta = reference.activated(
            x, gamma, beta, dy, axes, epsilon, case.activation, _weights(mask)
        )
    return {"y": y, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}


def assert_close(actual, expected, tolerance, what, *, scale_floor=1e-30):
    """Relative to the largest expected magnitude (at least `scale_floor`), so near-zero
    entries get a fair bound."""
    expected = np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), scale_floor)
    np.testing.assert_allclose(
        actual, expected, rtol=tolerance, atol=tolerance * scale, err_msg=what
    )


# Float32 sums in a different order (per replica, then across) differ from one device's by a
# few ulps of the sum; the tolerance is against the largest value of each tensor.
FLOAT32_TOLERANCE = 2e-5
# The float64 reference also sees the float32 rounding of the shift and of x − k.
FLOAT64_TOLERANCE = 1e-4


def _check_outputs_and_gradients(results, name, replicas):
    expected = single_device(name)
    exact = float64_reference(name)
    for field in ("y", "dx", "dgamma", "dbeta"):
        actual = results[sync_worker.result_key(name, replicas, field)]
        if field in ("dgamma", "dbeta"):
            # Each replica returns its own share; the optimizer's gradient all-reduce sums them.
            actual = actual.sum(axis=0)
        assert actual.shape == expected[field].shape, field
        assert_close(actual, expected[field], FLOAT32_TOLERANCE, f"{field} vs single device")
        assert_close(actual, exact[field], FLOAT64_TOLERANCE, f"{field} vs float64 reference")


def _check_statistics(results, name, replicas):
    expected = single_device(name)
    for field in ("moving_mean", "moving_variance", "skipped_updates", "population_count",
                  "population_dof"):
        if field not in expected:
            continue
        per_replica = results[sync_worker.result_key(name, replicas, field)]
        assert len(per_replica) == replicas
        # Every replica computed the same global moments, so every replica stores the same.
        for r in range(1, replicas):
            np.testing.assert_array_equal(per_replica[r], per_replica[0], err_msg=field)
        assert_close(per_replica[0], expected[field], FLOAT32_TOLERANCE, field)
    assert int(results[sync_worker.result_key(name, replicas, "skipped_updates")][0]) == 0


# --- MirroredStrategy over logical CPU devices -----------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name,replicas", MIRRORED_GRID)
def test_mirrored_outputs_and_gradients_equal_one_device(mirrored, name, replicas):
    _check_outputs_and_gradients(mirrored, name, replicas)


@pytest.mark.slow
@pytest.mark.parametrize("name,replicas", MIRRORED_GRID)
def test_mirrored_statistics_equal_one_device(mirrored, name, replicas):
    _check_statistics(mirrored, name, replicas)


def test_large_mean_case_defeats_unshifted_sums():
    """The stability case is one where summing Σx and Σx² across replicas (E[x²] − E[x]², as
    Keras's synchronized BN does) returns noise in float32, so passing it needs the shift."""
    x = CASES["conv_large_mean"].inputs(sync_worker.case_seed("conv_large_mean"))[0]
    axes = (0, 1, 2)
    exact = x.astype(np.float64).var(axis=axes)
    naive = np.mean(np.square(x), axis=axes) - np.square(np.mean(x, axis=axes))
    assert np.all(np.abs(naive - exact) > 0.5 * exact), (naive, exact)


def _fit_results(results, prefix):
    count = len([k for k in results if k.startswith(f"{prefix}__initial_")])
    return (
        [results[f"{prefix}__initial_{i}"] for i in range(count)],
        [results[f"{prefix}__final_{i}"] for i in range(count)],
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "prefix", ["fit", "fit_jit_one_replica"], ids=["two_replicas", "one_replica_jit_compile"]
)
def test_model_fit_under_mirrored_strategy_equals_one_device(mirrored, prefix):
    """model.fit with synchronized layers: the weights after two SGD steps on global batches are
    those of one device on the same batches (loss and BN statistics both over the global batch).

    Two replicas run without XLA: TensorFlow refuses to compile a step spanning several devices
    for any model. jit_compile=True runs on one replica, where synchronized=True is the fused
    path and must compile inside the model's XLA cluster.
    """
    initial, final = _fit_results(mirrored, prefix)
    # The reference runs without XLA either way: it is the same math, and one XLA compile of
    # the whole step here would cost more than the rest of the comparison.
    expected = sync_worker.fit(
        sync_worker.small_conv_model(synchronized=False),
        jit_compile=False,
        initial_weights=initial,
    )
    assert len(final) == len(expected)
    for i, (actual, wanted) in enumerate(zip(final, expected, strict=True)):
        assert np.all(np.isfinite(actual)), i
        # A conv bias right before BN has an exactly zero gradient: it holds rounding noise of
        # ~1e-8 on both sides, so the bound is floored at the scale of a weight, not of noise.
        assert_close(actual, wanted, 1e-4, f"weight {i}", scale_floor=0.1)
    # The steps did change the weights (a no-op fit would pass the comparison trivially).
    assert any(not np.array_equal(a, b) for a, b in zip(initial, final, strict=True))


@pytest.mark.slow
def test_unsynchronized_replicas_store_the_mean_of_their_updates(mirrored):
    """Each replica normalizes with its own share, and the stored statistics are the replicas'
    mean update, the same on every replica (Keras 3 leaves them to drift apart)."""
    case = CASES["dense"]
    x, *_ = case.inputs(sync_worker.case_seed("dense"))
    sizes = case.split_sizes(2)
    shares = np.split(x, np.cumsum(sizes)[:-1])
    m = sync_worker.MOMENTUM
    means, variances = [], []
    for share in shares:
        mean, var, count = reference.moments(share, (1,))
        means.append(m * 0.0 + (1 - m) * mean.reshape(-1))
        variances.append(m * 1.0 + (1 - m) * reference.unbiased(var, count).reshape(-1))
    for field, expected in (("moving_mean", means), ("moving_variance", variances)):
        per_replica = mirrored[f"unsynchronized__{field}"]
        np.testing.assert_array_equal(per_replica[1], per_replica[0], err_msg=field)
        assert_close(per_replica[0], np.mean(expected, axis=0), FLOAT32_TOLERANCE, field)
    # Replicas did see different shares: a synchronized result would differ.
    assert not np.allclose(means[0], means[1])


@pytest.mark.slow
def test_population_statistics_under_mirrored_strategy_equals_one_device(mirrored):
    """The pass runs whole batches, so under a strategy it gives one device's statistics, and
    every replica stores them."""
    count = len([k for k in mirrored if k.startswith("population__initial_")])
    model = sync_worker.small_conv_model(synchronized=False)
    model.set_weights([mirrored[f"population__initial_{i}"] for i in range(count)])
    kerasbn.population_statistics(
        model, sync_worker.fit_data()[0], batch_size=sync_worker.FIT_BATCH, verbose=0
    )
    layers = [layer for layer in model.layers if isinstance(layer, kerasbn.BatchNormalization)]
    for i, layer in enumerate(layers):
        for field in ("moving_mean", "moving_variance"):
            per_replica = mirrored[f"population__bn{i}_{field}"]
            assert len(per_replica) == 2
            np.testing.assert_array_equal(per_replica[1], per_replica[0], err_msg=field)
            assert_close(per_replica[0], getattr(layer, field).numpy(), FLOAT32_TOLERANCE, field)


# --- MultiWorkerMirroredStrategy: two processes on 127.0.0.1 ---------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", MULTIWORKER_CASES)
def test_multiworker_equals_one_device(multiworker, name):
    _check_outputs_and_gradients(multiworker, name, MULTIWORKER_REPLICAS)
    _check_statistics(multiworker, name, MULTIWORKER_REPLICAS)


# --- without a strategy ----------------------------------------------------------------------


def test_without_a_strategy_the_fused_kernel_is_used():
    assert _sync.select_batch_norm(True) is kernel.fused_batch_norm
    assert _sync.select_batch_norm(False) is kernel.fused_batch_norm
    assert _sync.synchronizing_replica_context() is None


@pytest.mark.parametrize("name", ["dense", "masked", "channels_first_population"])
def test_synchronized_without_a_strategy_equals_unsynchronized_exactly(name):
    synchronized = run_without_strategy(name, synchronized=True)
    unsynchronized = run_without_strategy(name, synchronized=False)
    assert synchronized.keys() == unsynchronized.keys()
    for field, value in unsynchronized.items():
        np.testing.assert_array_equal(synchronized[field], value, err_msg=field)


def test_synchronized_single_value_batch_without_strategy_is_still_refused():
    """Only replicas of a synchronized batch may hold one value each; alone it is an error."""
    layer = kerasbn.BatchNormalization(synchronized=True)
    with pytest.raises(ValueError, match=r"inputs.shape=\(1, 3\)"):
        layer(np.ones((1, 3), np.float32), training=True)


def test_synchronized_survives_the_config_round_trip():
    layer = kerasbn.BatchNormalization(synchronized=True)
    clone = kerasbn.BatchNormalization.from_config(layer.get_config())
    assert clone.synchronized is True
    serialized = keras.saving.serialize_keras_object(layer)
    assert keras.saving.deserialize_keras_object(serialized).synchronized is True


def test_synchronized_stages_keep_float64(rng):
    """The synchronized kernel's stages take float64 in float64, as the fused kernel does (run
    in the default replica context, whose all-reduce over one replica is the identity)."""
    x = tf.constant(1e4 + 1e-2 * rng.standard_normal((6, 3)), tf.float64)
    gamma = tf.constant(rng.uniform(0.5, 2.0, (1, 3)), tf.float64)
    beta = tf.constant(rng.standard_normal((1, 3)), tf.float64)
    dy = tf.constant(rng.standard_normal((6, 3)), tf.float64)
    results = []
    for run in (
        lambda: _sync.synchronized_batch_norm(
            x, gamma, beta, reduction_axes=(0,), epsilon=1e-3,
            replica_context=tf.distribute.get_replica_context(),
        ),
        lambda: kernel.fused_batch_norm(x, gamma, beta, reduction_axes=(0,), epsilon=1e-3),
    ):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            y, mean, variance, _ = run()
            loss = tf.reduce_sum(y * dy)
        results.append([y, mean, variance, *tape.gradient(loss, [x, gamma, beta])])
    for synchronized, fused in zip(*results, strict=True):
        assert synchronized.dtype == tf.float64
        np.testing.assert_allclose(synchronized.numpy(), fused.numpy(), rtol=1e-12, atol=1e-12)
