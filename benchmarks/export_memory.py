"""Peak resident memory of each stage of `kerasbn.export.to_onnx`, and of what `zoo.py` adds.

    .venv/bin/python benchmarks/export_memory.py ConvNeXtSmall            # to_onnx's stages
    .venv/bin/python benchmarks/export_memory.py ConvNeXtBase --zoo       # plus zoo.py's twin
    .venv/bin/python benchmarks/export_memory.py ConvNeXtTiny --peer      # plus Keras's export
    .venv/bin/python benchmarks/export_memory.py ConvNeXtBase --limit 12  # stop past 12 GiB

The architecture is built as `zoo.py` builds it (`_zoo_models.build`, weights=None). Each stage
is a function of the exporter wrapped for the run (the library is not changed): on entering and
leaving one, the process's high-water mark (VmHWM in /proc/self/status) is read and then reset
to the current resident size (writing "5" to /proc/self/clear_refs), so each stage's peak is
the most the process held while it ran, nested stages included in their parents. A stage's
growth is its peak less the resident size when it started; the table gives both in GiB and as
multiples of the model's weight bytes.

A watchdog thread samples the resident size every 50 ms and ends the process (exit code 3)
past `--limit` GiB, so a run never takes the machine's memory from others.
"""

from __future__ import annotations

import kerasbn_programs

kerasbn_programs.quiet_tensorflow_import()  # before anything imports TensorFlow

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _zoo_models  # noqa: E402  (a sibling file, not an installed module)
from _memory import reset_peak, status_bytes  # noqa: E402  (as above)

GIB = 1 << 30


class Stages:
    """Each stage's (resident at start, peak while running), nested stages counted in parents."""

    def __init__(self):
        self.rows = []  # [name, depth, start bytes, peak bytes, end bytes]
        self._open = []

    def _fold_peak(self):
        peak = status_bytes("VmHWM")
        for row in self._open:
            row[3] = max(row[3], peak)
        reset_peak()

    @contextlib.contextmanager
    def stage(self, name):
        self._fold_peak()
        row = [name, len(self._open), status_bytes("VmRSS"), 0, 0]
        row[3] = row[2]
        self.rows.append(row)
        self._open.append(row)
        try:
            yield
        finally:
            self._fold_peak()
            self._open.pop()
            row[4] = status_bytes("VmRSS")

    def wrap(self, owner, attribute, name=None):
        """Replace `owner.attribute` (a function) by one that runs as a stage."""
        function = getattr(owner, attribute)

        @functools.wraps(function)
        def staged(*args, **kwargs):
            with self.stage(name or attribute):
                return function(*args, **kwargs)

        setattr(owner, attribute, staged)

    def table(self, weight_bytes):
        lines = [
            "| stage | start GiB | peak GiB | growth GiB | growth × weights | end GiB |",
            "|---|---|---|---|---|---|",
        ]
        for name, depth, start, peak, end in self.rows:
            growth = peak - start
            lines.append(
                f"| {'  ' * depth}{name} | {start / GIB:.2f} | {peak / GIB:.2f} | "
                f"{growth / GIB:.2f} | {growth / weight_bytes:.1f} | {end / GIB:.2f} |"
            )
        return "\n".join(lines)


def watchdog(limit_bytes):
    def watch():
        while True:
            if status_bytes("VmRSS") > limit_bytes:
                print(f"export_memory: resident memory over {limit_bytes / GIB:g} GiB, stopped",
                      file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def instrument(stages):
    """Wrap the exporter's stages (imports here: after TensorFlow started quietly)."""
    import onnx
    from tf2onnx import graph as tf2onnx_graph
    from tf2onnx import optimizer

    from kerasbn.export import convert, tf2onnx_steps, verification
    from kerasbn.export import onnx as export_onnx

    stages.wrap(export_onnx, "fold_batchnorm", "fold / clone")
    stages.wrap(export_onnx, "convert", "convert")
    stages.wrap(convert, "frozen_graph", "trace + freeze")
    stages.wrap(tf2onnx_steps, "grappler_request", "grappler request")
    stages.wrap(tf2onnx_steps, "optimize_graph_def", "grappler")
    stages.wrap(tf2onnx_steps, "_onnx_graph", "tf2onnx: import + process_tf_graph")
    stages.wrap(optimizer, "optimize_graph", "tf2onnx: optimizers")
    stages.wrap(tf2onnx_graph.Graph, "make_model", "tf2onnx: make_model")
    stages.wrap(convert, "remove_identity_reshapes", "identity reshapes")
    stages.wrap(convert, "_check_graph", "check graph")
    stages.wrap(onnx.checker, "check_model", "onnx.checker")
    stages.wrap(export_onnx, "_write_model", "serialize + write")
    stages.wrap(export_onnx, "compare", "verify")
    stages.wrap(verification, "_session", "ORT session")
    stages.wrap(verification, "_against_float64", "float64 comparison")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a keras.applications architecture")
    parser.add_argument("--size", type=int, default=1)
    parser.add_argument("--zoo", action="store_true",
                        help="also the float64 twin and ONNX Runtime on ours, as zoo.py runs them")
    parser.add_argument("--peer", action="store_true",
                        help="also Keras's own export, as zoo.py measures it")
    parser.add_argument("--limit", type=float, default=10.0,
                        help="GiB of resident memory at which the process ends itself")
    args = parser.parse_args(argv)
    watchdog(args.limit * GIB)
    stages = Stages()
    instrument(stages)
    import zoo  # a sibling program: the zoo's own measure functions

    from kerasbn.export import to_onnx

    with stages.stage("build"):
        model, size = _zoo_models.build(args.name, at_least=args.size)
    weight_bytes = sum(np.asarray(w).nbytes for w in model.weights)
    images = _zoo_models.random_images(args.name, size, zoo.VERIFY_IMAGES, seed=1)
    with stages.stage("predict"):
        expected = model.predict(images, verbose=0)
    with tempfile.TemporaryDirectory() as directory:
        if args.zoo:
            from kerasbn.export.float64_reference import float64_twin

            with stages.stage("zoo: float64 twin + predict"):
                twin = float64_twin(model)
                twin.predict(images.astype("float64"), verbose=0)
                del twin
        with stages.stage("to_onnx"):
            to_onnx(model, os.path.join(directory, "ours.onnx"), samples=images)
        if args.zoo:
            with stages.stage("zoo: ORT run of ours"):
                zoo.onnx_outputs(os.path.join(directory, "ours.onnx"), images)
        if args.peer:
            with stages.stage("zoo: peer (Keras's export + ORT)"):
                zoo.measure_peer(model, images, expected, directory)
    print(f"{args.name} at {size}×{size}: {model.count_params() / 1e6:.1f} M parameters, "
          f"{weight_bytes / GIB:.3f} GiB of weights; process peak "
          f"{status_bytes('VmPeak') / GIB:.1f} GiB virtual")
    print(stages.table(weight_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
