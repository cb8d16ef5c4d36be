"""Import TensorFlow without its start-up noise, before anything else in kerasbn imports it.

TensorFlow 2.21 writes absl `I0000 …` lines (oneDNN, CUDA drivers) to the C-level stderr while it
loads, before it reads any logging setting, and an `E0000 … cuInit` line at device discovery, so
no environment variable hides them. We point file descriptor 2 at /dev/null for the import and
device discovery only; Python exceptions still propagate. Later C++ logs obey
TF_CPP_MIN_LOG_LEVEL, which we default to 2 (errors only).

A user who imported TensorFlow first, or asked for its INFO logs with TF_CPP_MIN_LOG_LEVEL=0, has
chosen: we change nothing. (Any other level already excludes these INFO lines.)
"""

import os
import sys


def _import_tensorflow_quietly():
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        import tensorflow  # noqa: F401

        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf

        # Device discovery logs a CUDA error on CPU-only machines: do it while stderr is muted.
        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_import_tensorflow_quietly()
