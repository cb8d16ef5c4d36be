"""What kerasbn's programs share and its library must not do: start TensorFlow quietly.

The `kerasbn` command, the examples, the benchmarks and the test suite are programs: each may
decide what its process prints. The library (`import kerasbn`) never touches the process's
streams or environment, so a user's own script sees everything TensorFlow says, crash messages
included.

TensorFlow 2.21 writes absl `I0000 …` lines (oneDNN, CUDA drivers) to the C-level stderr while it
loads, before it reads any logging setting, and an `E0000 … cuInit` line at device discovery, so
no environment variable hides them. `quiet_tensorflow_import()` points file descriptor 2 at
/dev/null for that import and device discovery only (Python exceptions still propagate), and
defaults TF_CPP_MIN_LOG_LEVEL to 2 (errors only) for this process's later C++ logs. It must run
before anything imports TensorFlow, which is why this module is not part of the `kerasbn` package
(importing `kerasbn.…` imports TensorFlow) and why it is the command's entry point.

A process that imported TensorFlow already, or asked for its INFO logs with
TF_CPP_MIN_LOG_LEVEL=0, has chosen: nothing changes.
"""

import os
import sys


def quiet_tensorflow_import():
    """Import TensorFlow now, with its start-up lines kept out of stderr (see the module doc)."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
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


def kerasbn_command():
    """The `kerasbn` console script: TensorFlow starts quietly, then `kerasbn.export.cli`."""
    quiet_tensorflow_import()
    from kerasbn.export.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(kerasbn_command())
