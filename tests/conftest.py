"""Shared test setup: a quiet TensorFlow, reproducible seeds, and hypothesis settings for TF."""

import kerasbn_programs

# The test suite is a program: it starts TensorFlow quietly, before anything imports it.
kerasbn_programs.quiet_tensorflow_import()

import os

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# TensorFlow traces and XLA-compiles per new shape, so single examples can take seconds:
# no per-example deadline, and a modest number of examples per property.
settings.register_profile(
    "kerasbn",
    deadline=None,
    max_examples=int(os.environ.get("KERASBN_HYPOTHESIS_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("kerasbn")


@pytest.fixture(autouse=True)
def _reset_keras_state():
    """Every test starts from the same seeds and a float32 policy, whatever ran before."""
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
