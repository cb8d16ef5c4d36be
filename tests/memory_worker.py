"""`to_onnx`'s peak resident memory on a model whose weights dominate, in a fresh process.

Why a separate process. Resident memory is the process's: what earlier tests left allocated (or
freed but kept by the allocator) would hide or fake the growth of one export. A fresh process
measures from a known state: the model built, its weights read once, the high-water mark reset
(writing "5" to /proc/self/clear_refs); then `to_onnx` with its defaults (fold, baseline
conversion, checker, ONNX Runtime verification), and VmHWM read back.

    python -m tests.memory_worker OUT.onnx     # prints {"growth": bytes, "weights": bytes}

The model: Dense layers of WIDTH×WIDTH with a BatchNormalization after each hidden one, so the
export folds them and converts the unfolded model once more for the baseline count.
"""

from __future__ import annotations

import kerasbn_programs

kerasbn_programs.quiet_tensorflow_import()  # before anything imports TensorFlow

import json
import sys

import keras
import numpy as np

from benchmarks._memory import reset_peak, status_bytes
from kerasbn.export import to_onnx

WIDTH = 2048
HIDDEN = 4  # 4 × 2048² weights: 64 MiB of float32


def model():
    layers = keras.layers
    x = inputs = keras.Input((WIDTH,))
    for _ in range(HIDDEN):
        x = layers.ReLU()(layers.BatchNormalization()(layers.Dense(WIDTH)(x)))
    return keras.Model(inputs, layers.Dense(4)(x))


def main(path):
    exported = model()
    weights = sum(np.asarray(w).nbytes for w in exported.weights)
    reset_peak()  # the high-water mark from here on
    start = status_bytes("VmRSS")
    to_onnx(exported, path, random_samples=2)
    print(json.dumps({"growth": status_bytes("VmHWM") - start, "weights": weights}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
