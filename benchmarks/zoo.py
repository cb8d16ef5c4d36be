"""Every keras.applications architecture through `kerasbn.export.to_onnx` and through Keras's own
ONNX export, side by side.

For each architecture of the installed Keras (found by inspecting `keras.applications`), built
with `weights=None` at its smallest accepted input (or `--size`, where it accepts that) and with
every BN given non-trivial statistics and γ/β (`_zoo_models.build`):

  ours   `to_onnx(model, path, samples=images)` with its default tolerances: the fold report
         (folded, of which forward, kept, refused), ONNX nodes ours vs the unfolded export,
         BatchNormalization nodes and BN multiply-adds left, seconds; a failure is recorded
         with its exception type and first line;
  peer   Keras's `model.export(path, format="onnx")`: does it export, does ONNX Runtime load
         and run it, nodes, BN multiply-adds left.

Both files are then run by this script in ONNX Runtime on the same preprocessed random images
and compared with Keras's `model.predict` (max abs error). As a yardstick for float32 rounding,
the same model is rebuilt in float64 and "f32 noise" is max |Keras float32 − Keras float64|:
an export whose error is of that size is as right as Keras itself.

Each architecture runs in processes of its own (memory comes back whole between models): one
builds it and runs ours, a second builds it again and measures the float32 noise, a third the
peer, so that no part's memory adds to another's (a row records each one's peak,
`part_peak_gib`; `peak_gib` is the largest). This process watches them: one whose resident
memory passes `--memory-limit` or that runs past `--timeout` is stopped and recorded as such.

    .venv/bin/python benchmarks/zoo.py                 # all of them (about an hour on 2 cores)
    .venv/bin/python benchmarks/zoo.py --quick         # the smallest of each family
    .venv/bin/python benchmarks/zoo.py --only ResNet50,MobileNetV3Small --size 64
    .venv/bin/python benchmarks/zoo.py --write         # also the "Zoo" section of RESULTS.md
    .venv/bin/python benchmarks/zoo.py --json z.json --resume   # run only what z.json lacks

With `--resume`, architectures already in the `--json` file keep their row and are not run
again, except those named with `--only`, which are run again and replace their row. Every row
records the commit it was measured with, and the section names them all.
"""

from __future__ import annotations

import kerasbn_programs

kerasbn_programs.quiet_tensorflow_import()  # before anything imports TensorFlow

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import onnx
import onnxruntime
import tensorflow as tf
import tf2onnx

import kerasbn
from kerasbn.export import VerificationError, to_onnx
from kerasbn.export.float64_reference import float64_twin

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _zoo_models  # noqa: E402  (a sibling file, not an installed module)
from _memory import status_bytes  # noqa: E402  (as above)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
SECTION = "## Zoo: every `keras.applications` architecture (`benchmarks/zoo.py`)"
VERIFY_IMAGES = 4
GIB = 1 << 30


# --- one architecture, in a child process ---------------------------------------------------------


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def onnx_outputs(path, images):
    """ONNX Runtime's first output for `images` (the session is made here: loading is a step)."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def measure_ours(model, images, expected, directory):
    bn_names = [layer.name for layer in _zoo_models.batch_norm_layers(model)]
    path = os.path.join(directory, "ours.onnx")
    row = {}
    start = time.perf_counter()
    try:
        report = to_onnx(model, path, samples=images)
    except VerificationError as error:
        row.update(error=first_line(error), verify_error=error.report.max_abs_error)
        report = error.report
    except Exception as error:  # noqa: BLE001  (the table records every failure)
        row["error"] = first_line(error)
        return {**row, "seconds": time.perf_counter() - start}
    row["seconds"] = time.perf_counter() - start
    if report.verification is not None and report.verification.float32_error is not None:
        # Out of tolerance against Keras float32, judged against the model in float64.
        row["verified_against_float64"] = report.verification.float32_error
    row.update(
        nodes=report.node_count,
        unfolded_nodes=report.unfolded_node_count,
        steps={step: round(s, 2) for step, s in report.seconds.items()},
    )
    fold = report.fold
    if fold is not None:
        row.update(
            folded=len(fold.folded),
            folded_forward=sum(r.action == "folded_forward" for r in fold.records),
            kept=len(fold.kept),
            refused=len(fold.refused),
            reasons=sorted({r.reason for r in fold.refused + fold.kept}),
            unreported=sorted(set(bn_names) - {r.bn.rsplit("/", 1)[-1] for r in fold.records}),
        )
    if "error" in row:
        # Refused by verification, so nothing was written: convert once more without it, to
        # read the file's structure and measure its error here.
        try:
            to_onnx(model, path, samples=images, verify=False, baseline=False)
        except Exception as error:  # noqa: BLE001
            row["unverified_error"] = first_line(error)
            return row
    proto = onnx.load(path)
    folded = [r.bn.rsplit("/", 1)[-1] for r in fold.folded] if fold else []
    row.update(
        bn_ops=_zoo_models.op_count(proto, "BatchNormalization"),
        bn_arithmetic=sum(_zoo_models.bn_arithmetic(proto, model).values()),
        folded_bn_arithmetic=sum(_zoo_models.bn_arithmetic(proto, model, folded).values()),
        error_vs_predict=float(np.max(np.abs(onnx_outputs(path, images) - expected))),
    )
    return row


def measure_peer(model, images, expected, directory):
    path = os.path.join(directory, "peer.onnx")
    row = {"exports": False, "runs": False}
    start = time.perf_counter()
    try:
        model.export(path, format="onnx", verbose=False)
    except Exception as error:  # noqa: BLE001
        row["error"] = first_line(error)
        return row
    finally:
        row["seconds"] = time.perf_counter() - start
    row["exports"] = True
    proto = onnx.load(path)
    row.update(
        nodes=len(proto.graph.node),
        bn_ops=_zoo_models.op_count(proto, "BatchNormalization"),
        bn_arithmetic=sum(_zoo_models.bn_arithmetic(proto, model).values()),
    )
    try:
        got = onnx_outputs(path, images)
    except Exception as error:  # noqa: BLE001
        row["error"] = first_line(error)
        return row
    row["runs"] = True
    row["error_vs_predict"] = float(np.max(np.abs(got - expected)))
    return row


def run_child(args):
    """Measures one part of one architecture: "ours" (the build and `to_onnx`), "noise" (the
    float32 noise against the float64 twin) or "peer" (Keras's export); writes the result JSON
    after each step, so a step that runs out of memory still leaves the steps before it."""
    result = {"name": args.child}

    def save():
        with open(args.result, "w") as file:
            json.dump(result, file)

    tf.get_logger().setLevel("ERROR")
    name = args.child
    start = time.perf_counter()
    model, size = _zoo_models.build(name, at_least=args.size)
    images = _zoo_models.random_images(name, size, VERIFY_IMAGES, seed=1)
    expected = model.predict(images, verbose=0)
    if args.part == "ours":
        result.update(
            size=size,
            params=model.count_params(),
            bn=len(_zoo_models.batch_norm_layers(model)),
            build_seconds=time.perf_counter() - start,
            output_scale=float(np.max(np.abs(expected))),
        )
        save()
        with tempfile.TemporaryDirectory() as directory:
            result["ours"] = measure_ours(model, images, expected, directory)
        save()
        return 0
    if args.part == "noise":
        try:
            twin = float64_twin(model)
            result["f32_noise"] = float(
                np.max(np.abs(expected - twin.predict(images.astype("float64"), verbose=0)))
            )
        except Exception as error:  # noqa: BLE001
            result["f32_noise_error"] = first_line(error)
        save()
        return 0
    with tempfile.TemporaryDirectory() as directory:
        result["peer"] = measure_peer(model, images, expected, directory)
    save()
    return 0


# --- the parent: one process per architecture, watched ------------------------------------------


def run_one(name, args):
    """Runs the children for `name`: ours, the float32 noise and Keras's export, each in a
    process of its own (the float64 twin and Keras's export hold the weights many times over:
    in one process, each one's memory would add to the next one's and the memory limit would
    stop the last for what the others left), each stopped at the memory or time limit; returns
    the row, with each process's peak resident memory."""
    result = {"name": name}
    start = time.perf_counter()
    peaks = {}
    for part in ("ours", "noise") if args.no_peer else ("ours", "noise", "peer"):
        measured, peaks[part], cause = _run_part(name, part, args)
        result.update(measured)
        if cause:
            # The step that was running when the process died is the one that failed.
            if "size" not in result:
                result["build"] = {"error": cause, "died": True}
                break
            if part == "noise":
                result["f32_noise_error"] = cause  # died in the float64 twin
                continue
            result[part] = {**result.get(part, {}), "error": cause, "died": True}
    result.update(seconds=time.perf_counter() - start, peak_gib=max(peaks.values()) / GIB,
                  part_peak_gib={part: peak / GIB for part, peak in peaks.items()})
    return result


def _run_part(name, part, args):
    """(the child's result, its peak resident bytes, why it died or None) for one part."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as file:
        result_path = file.name
    command = [sys.executable, os.path.abspath(__file__), "--child", name, "--part", part,
               "--size", str(args.size), "--result", result_path]
    start = time.perf_counter()
    peak, stopped = 0, None
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as child:
        # The child's output is TensorFlow's chatter, read only to tell why it died.
        stderr_lines = []
        reader = _drain(child, stderr_lines)
        while child.poll() is None:
            rss = status_bytes("VmRSS", child.pid) or 0  # 0: it has just ended
            peak = max(peak, rss)
            if rss > args.memory_limit * GIB:
                stopped = f"stopped: resident memory over {args.memory_limit:g} GiB"
            elif time.perf_counter() - start > args.timeout:
                stopped = f"stopped: over {args.timeout:g} s"
            if stopped:
                child.kill()
                break
            time.sleep(0.2)
        child.wait()
        reader.join()
    try:
        with open(result_path) as file:
            result = json.load(file)
    except (FileNotFoundError, json.JSONDecodeError):
        result = {}
    finally:
        os.unlink(result_path)
    result.pop("name", None)
    cause = None
    if child.returncode != 0:
        cause = (stopped or _death(child.returncode) or _last_error(stderr_lines)
                 or f"exit code {child.returncode}")
    return result, peak, cause


def _drain(child, lines):
    import threading

    def read():
        for line in child.stderr:
            lines.append(line.rstrip())
            del lines[:-50]
        child.stdout.read()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _death(returncode):
    """Why a process killed by a signal died (its stderr's last line is then unrelated: the
    kernel's out-of-memory killer sends SIGKILL), or None when it exited on its own."""
    if returncode >= 0:
        return None
    name = signal.Signals(-returncode).name
    if -returncode == signal.SIGKILL:
        return f"killed by {name} (the out-of-memory killer, unless a person sent it)"
    return f"killed by {name}"


def _last_error(lines):
    for line in reversed(lines):
        if line and not line.startswith((" ", "\t", "W0000", "I0000")) and ":" in line:
            return line[:300]
    return None


# --- the table ---------------------------------------------------------------------------------


def _g(value, digits=2):
    return "–" if value is None else f"{value:.{digits}g}"


def _short(message, limit=140):
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _ours_cells(row):
    ours = row.get("ours", {})
    if "folded" in ours:
        fold = f"{ours['folded']} ({ours['folded_forward']}) / {ours['kept']} / {ours['refused']}"
    else:
        fold = "–"
    nodes = "–"
    if "nodes" in ours:
        nodes = f"{ours['nodes']} / {ours['unfolded_nodes'] or ours['nodes']}"
    left = "–"
    if "bn_ops" in ours:
        left = f"{ours['bn_ops']} / {ours['bn_arithmetic']}"
    error = ours.get("error_vs_predict")
    status = _short(ours["error"]) if "error" in ours else ("ok" if error is not None else "–")
    if status == "ok" and "verified_against_float64" in ours:
        status = "ok (vs float64)"
    return [fold, nodes, left, _g(error), f"{ours.get('seconds', 0):.0f}", status]


def _peer_cells(row):
    peer = row.get("peer")
    if peer is None:
        return ["not run"] * 4
    nodes = "–" if "nodes" not in peer else f"{peer['nodes']}"
    left = "–" if "bn_ops" not in peer else f"{peer['bn_ops']} / {peer['bn_arithmetic']}"
    if peer.get("runs"):
        status = "ok"
    elif peer.get("exports"):
        status = f"exports; ONNX Runtime: {_short(peer.get('error', '?'))}"
    else:
        status = _short(peer.get("error", "?"))
    return [nodes, left, _g(peer.get("error_vs_predict")), status]


HEADER = [
    "architecture", "input", "params", "BN", "folded (fwd) / kept / refused",
    "nodes ours / unfolded", "BN ops / BN mul-add left", "max abs err", "f32 noise",
    "output scale", "s", "ours", "peer nodes", "peer BN ops / mul-add left",
    "peer max abs err", "peer",
]


def table(results):
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in results:
        ours, peer = _ours_cells(row), _peer_cells(row)
        if "size" not in row:
            cells = [row["name"], "–", "–", "–"]
        else:
            cells = [row["name"], str(row["size"]), f"{row['params'] / 1e6:.1f} M", str(row["bn"])]
        cells += ours[:4] + [_g(row.get("f32_noise")), _g(row.get("output_scale"))]
        cells += ours[4:] + peer
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _ours_ok(row):
    ours = row.get("ours", {})
    return "error" not in ours and ours.get("error_vs_predict") is not None


def summary(results):
    ours_ok = [r["name"] for r in results if _ours_ok(r)]
    peer_ok = [r["name"] for r in results if r.get("peer", {}).get("runs")]
    only_peer = sorted(set(peer_ok) - set(ours_ok))
    left = [r["name"] for r in results if r.get("ours", {}).get("folded_bn_arithmetic")]
    more = [
        r["name"] for r in results
        if (r.get("ours", {}).get("unfolded_nodes") or 0) < (r.get("ours", {}).get("nodes") or 0)
    ]
    lines = [
        f"- kerasbn `to_onnx` exports and verifies {len(ours_ok)} of {len(results)}; Keras's "
        f"`model.export` gives a file ONNX Runtime runs for {len(peer_ok)} of {len(results)}.",
        f"- Where Keras's export runs and ours does not: {', '.join(only_peer) or 'none'}.",
        f"- Folded BN layers with multiply-adds still in our file: {', '.join(left) or 'none'}.",
        f"- More nodes than the unfolded export: {', '.join(more) or 'none'}.",
    ]
    return "\n".join(lines)


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if "model name" in line)
        with open("/proc/meminfo") as file:
            memory = int(next(line.split()[1] for line in file if line.startswith("MemTotal")))
    except (OSError, StopIteration):
        memory = 0
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} CPU cores, {memory / (1 << 20):.0f} GiB; "
        f"Python {platform.python_version()}, TensorFlow {tf.__version__}, Keras "
        f"{keras.__version__}, tf2onnx {tf2onnx.__version__}, ONNX Runtime "
        f"{onnxruntime.__version__}, kerasbn {kerasbn.__version__}"
    )


LEGEND = """\
Columns: input = side of the square input (each architecture's smallest accepted, or `--size`);
BN = BatchNormalization layers; folded (fwd) / kept / refused = `to_onnx`'s fold report;
nodes = ONNX nodes of our file and of tf2onnx's export of the unfolded model; BN ops / BN mul-add
left = ONNX `BatchNormalization` nodes, and Mul/Add/Sub nodes named after a BN layer (tf2onnx
merges a BN's multiply-add into a following channels_last Conv itself, so those are not left);
max abs err = max |ONNX Runtime − Keras `predict`| on 4 preprocessed random images, measured by
this script; f32 noise = max |Keras float32 − the same model in float64|, the rounding any
float32 evaluation has; output scale = max |logit|; s = wall seconds of `to_onnx` (fold,
convert, baseline conversion, verify); ours / peer = "ok" or the failure (exception type and
first line), "ok (vs float64)" where verification found ONNX Runtime out of tolerance against
Keras float32 and passed it against the model in float64; peer = Keras's
`model.export(format="onnx")`."""


def write_section(text):
    with open(RESULTS) as file:
        content = file.read()
    start = content.find(SECTION)
    if start >= 0:
        end = content.find("\n## ", start + len(SECTION))
        content = content[:start] + text + ("" if end < 0 else content[end:])
    else:
        content = content.rstrip("\n") + "\n\n" + text
    with open(RESULTS, "w") as file:
        file.write(content if content.endswith("\n") else content + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=lambda s: [n for n in s.split(",") if n],
                        help="comma-separated architecture names (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="the smallest architecture of each family only")
    parser.add_argument("--size", type=int, default=1,
                        help="input side; an architecture needing more gets its minimum "
                             "(default: each one's minimum)")
    parser.add_argument("--no-peer", action="store_true", help="skip Keras's own export")
    parser.add_argument("--write", action="store_true",
                        help="also write the table into the Zoo section of benchmarks/RESULTS.md")
    parser.add_argument("--memory-limit", type=float, default=12.0,
                        help="GiB of resident memory at which a model's process is stopped")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds after which a model's process is stopped")
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --json; run the rest (and --only again)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=("ours", "noise", "peer"), default="ours",
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size < 1:
        parser.error(f"--size must be a positive integer. Received: --size={args.size}")
    if args.resume and not args.json:
        parser.error("--resume reads the results of an earlier run from --json FILE. "
                     "Received: --resume without --json")
    if args.child:
        return run_child(args)

    known = _zoo_models.architectures()
    if args.only:
        unknown = [n for n in args.only if n not in known]
        if unknown:
            parser.error(f"--only names no keras.applications architecture: {unknown}. "
                         f"Known: {', '.join(known)}")
        names = args.only
    elif args.quick:
        names = sorted(_zoo_models.smallest_per_family().values())
    else:
        names = list(known)

    # The smallest of each family first: a run cut short still covers every family.
    first = set(_zoo_models.smallest_per_family().values())
    names = sorted(names, key=lambda n: (n not in first, n))
    started = datetime.datetime.now(datetime.timezone.utc)
    command = " ".join(["benchmarks/zoo.py", *(sys.argv[1:] if argv is None else argv)])
    results = _earlier_results(args) if args.resume else []
    # A row named with --only is measured again; its earlier row stays until the new one
    # replaces it, so an interrupted run loses nothing.
    done = {r["name"] for r in results} - set(args.only or ())
    names = [n for n in names if n not in done]
    planned = len({r["name"] for r in results} | set(names))
    print(f"zoo: {len(names)} architectures to run; {machine()}", file=sys.stderr, flush=True)

    def publish():
        """Written after every architecture: an interrupted run keeps what it measured."""
        text = report(results, planned, started, command, args)
        if args.write:
            write_section(text + "\n")
        if args.json:
            with open(args.json, "w") as file:
                json.dump(results, file, indent=1)
        return text

    text = publish()
    commit = _commit()
    for name in names:
        result = run_one(name, args)
        result["commit"] = commit
        results = [r for r in results if r["name"] != name] + [result]
        ours = result.get("ours", {})
        state = "ok" if _ours_ok(result) else ours.get("error", "not run")
        peer = result.get("peer", {})
        peer_state = "ok" if peer.get("runs") else peer.get("error", "not run")
        print(f"  {name}: ours {state}; peer {peer_state}; {result['seconds']:.0f} s, "
              f"peak {result['peak_gib']:.1f} GiB", file=sys.stderr, flush=True)
        text = publish()
    print(text)
    return 0


def _earlier_results(args):
    try:
        with open(args.json) as file:
            return json.load(file)
    except FileNotFoundError:
        return []


def _commit():
    """The commit measured, with `+` when the work tree differs from it."""
    def git(*arguments):
        return subprocess.run(["git", *arguments], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD")
    return commit + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")


def report(results, planned, started, command, args):
    done = "" if len(results) == planned else f" Partial: {len(results)} of {planned} run."
    return "\n\n".join([
        SECTION,
        f"Run {started:%Y-%m-%d %H:%M} UTC on {machine()}. Command: `{command}`; each "
        f"architecture's parts in processes of their own (memory limit {args.memory_limit:g} "
        f"GiB each); measured at "
        f"commit {', '.join(sorted({r.get('commit', '?') for r in results}))}.{done}",
        summary(results),
        table(sorted(results, key=lambda r: r["name"])),
        LEGEND,
    ])


if __name__ == "__main__":
    sys.exit(main())
