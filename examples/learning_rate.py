"""Higher learning rates and saturating nonlinearities with BN (Ioffe & Szegedy, 2015, §4.2).

The paper's ImageNet comparison, shrunk to a small convnet on 8×8 digits: the same network
without BN ("Baseline"), with `kerasbn.BatchNormalization` before each nonlinearity at the
baseline learning rate ("BN-Baseline"), at 5× and 30× it ("BN-x5", "BN-x30"), with sigmoids
instead of ReLUs at 5× ("BN-x5-Sigmoid"), and the sigmoid network without BN
("Baseline-Sigmoid"). Not in the paper, but needed to read the result honestly: the baseline at
5× and 30× too ("Baseline-x5", "Baseline-x30"): if the baseline trains fine at a rate, BN was
not what made that rate usable.

All runs: SGD with momentum 0.9 (as the paper's Inception), mini-batches of 32, a constant
learning rate, the same initial weights (BN networks have no conv biases) and the same batch
order per seed. Reported: the steps until the test accuracy first reaches `--target`, and the
final test accuracy. Unlike the paper we change nothing else for the BN networks (no dropout to
remove, no learning-rate decay to speed up).

    python examples/learning_rate.py              # digits, ~2-4 minutes on 2 CPU cores
"""

from __future__ import annotations

import kerasbn_programs

kerasbn_programs.quiet_tensorflow_import()  # before anything imports TensorFlow

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _data
import keras
import numpy as np

import kerasbn

BATCH_SIZE = 32  # the paper's, for Inception
MOMENTUM = 0.9
BASE_LEARNING_RATE = 0.01
# Accuracy gaps up to this are "within noise" (4-5 of digits' 450 test images).
NOISE = 0.01


@dataclass(frozen=True)
class Run:
    name: str
    batch_norm: bool
    activation: str
    lr_multiplier: int

    @property
    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.lr_multiplier


RUNS = (
    Run("Baseline", False, "relu", 1),
    Run("BN-Baseline", True, "relu", 1),
    Run("BN-x5", True, "relu", 5),
    Run("BN-x30", True, "relu", 30),
    Run("BN-x5-Sigmoid", True, "sigmoid", 5),
    Run("Baseline-Sigmoid", False, "sigmoid", 1),
    Run("Baseline-x5", False, "relu", 5),
    Run("Baseline-x30", False, "relu", 30),
)


@dataclass
class Result:
    """One run with one seed; `accuracy[i]` is the test accuracy after `steps[i]` steps."""

    run: str
    seed: int
    steps: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    diverged_at: int | None = None  # first measurement with a non-finite training loss
    seconds: float = 0.0

    def steps_to(self, target: float) -> int | None:
        for step, accuracy in zip(self.steps, self.accuracy, strict=True):
            if accuracy >= target:
                return step
        return None


def build_convnet(input_shape, *, batch_norm: bool, activation: str, seed: int) -> keras.Model:
    """Three 3×3 convolutions (16, 32, 64 filters; the last two with stride 2), global average
    pooling and a softmax. With BN: conv (no bias) → BN → nonlinearity, as in the paper."""
    inputs = keras.Input(input_shape, name="image")
    h = inputs
    for i, (filters, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
        h = keras.layers.Conv2D(
            filters, 3, strides=stride, padding="same", use_bias=not batch_norm,
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + i), name=f"conv{i}",
        )(h)
        if batch_norm:
            h = kerasbn.BatchNormalization(name=f"batch_norm{i}")(h)
        h = keras.layers.Activation(activation, name=f"{activation}{i}")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = keras.layers.Dense(
        10, activation="softmax", name="softmax",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 4),
    )(h)
    return keras.Model(inputs, outputs)


class _Recorder(keras.callbacks.Callback):
    """Measures test accuracy at the start and every `eval_every` steps; stops on divergence."""

    def __init__(self, result: Result, data: _data.Data, eval_every: int):
        super().__init__()
        self.result, self.data, self.eval_every = result, data, eval_every

    def on_train_begin(self, logs=None):
        self._measure(0)

    def on_epoch_end(self, epoch, logs=None):
        step = (epoch + 1) * self.eval_every
        self._measure(step)
        if not math.isfinite((logs or {}).get("loss", 0.0)):
            self.result.diverged_at = step
            self.model.stop_training = True

    def _measure(self, step):
        self.result.steps.append(step)
        self.result.accuracy.append(_data.accuracy(self.model, self.data.x_test, self.data.y_test))


def train(run: Run, data: _data.Data, *, steps: int, eval_every: int, seed: int) -> Result:
    keras.utils.set_random_seed(seed)
    model = build_convnet(data.input_shape, batch_norm=run.batch_norm,
                          activation=run.activation, seed=seed)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=run.learning_rate, momentum=MOMENTUM),
        loss="sparse_categorical_crossentropy",
    )
    result = Result(run.name, seed)
    result.seconds = _data.train_steps(
        model, data, batch_size=BATCH_SIZE, steps=steps, measure_every=eval_every, seed=seed,
        callback=_Recorder(result, data, eval_every),
    )
    return result


# --- reporting ---------------------------------------------------------------------------------


def table_rows(runs, results, target: float) -> list[dict]:
    rows = []
    for run in runs:
        mine = [r for r in results if r.run == run.name]
        reached = [r.steps_to(target) for r in mine]
        rows.append({
            "run": run.name,
            "learning_rate": run.learning_rate,
            "steps_to_target": reached,  # one per seed, None = never
            "final_accuracy": float(np.mean([r.accuracy[-1] for r in mine])),
            "best_accuracy": float(np.mean([max(r.accuracy) for r in mine])),
            "diverged": sum(r.diverged_at is not None for r in mine),
            "seeds": len(mine),
        })
    return rows


def _steps_text(reached) -> str:
    return " / ".join("never" if s is None else str(s) for s in reached)


def print_table(rows, *, target: float, steps: int) -> None:
    seeds = rows[0]["seeds"]
    per_seed = f" (per seed, {seeds} seeds)" if seeds > 1 else ""
    print(f"\nSteps to {target:.0%} test accuracy{per_seed}, and test accuracy after "
          f"{steps} steps{' (mean over seeds)' if seeds > 1 else ''}")
    print(f"{'run':<17} {'lr':>6} | {'steps to target':>17} | {'final acc':>9} {'best acc':>9}")
    for row in rows:
        note = f"  diverged ({row['diverged']}/{row['seeds']})" if row["diverged"] else ""
        print(f"{row['run']:<17} {row['learning_rate']:>6.3g} | "
              f"{_steps_text(row['steps_to_target']):>17} | "
              f"{row['final_accuracy']:>9.3f} {row['best_accuracy']:>9.3f}{note}")


def verdict(rows, *, target: float, test_size: int | None = None) -> list[str]:
    """The paper's claims, each checked against this run's numbers, in plain words."""
    by = {row["run"]: row for row in rows}

    def steps(name):  # median over seeds; None when some seed never reached the target
        reached = by[name]["steps_to_target"]
        return None if None in reached else float(np.median(reached))

    def fmt(value):
        return "never" if value is None else f"{value:g}"

    def final(name):
        return by[name]["final_accuracy"]

    def fails(name):
        return by[name]["diverged"] > 0 or final(name) < 0.5

    def higher(a, b):  # does run a end above run b, by more than the noise?
        gap = final(a) - final(b)
        if abs(gap) <= NOISE:
            return "NOT SHOWN (within noise)"
        return "REPRODUCED" if gap > 0 else "NOT REPRODUCED"

    lines = []
    bn_names = [n for n in ("BN-Baseline", "BN-x5", "BN-x30") if n in by]
    if "Baseline" in by and bn_names:
        base = steps("Baseline")
        reached = [(steps(n), n) for n in bn_names if steps(n) is not None]
        fastest = min(reached) if reached else None
        if fastest is not None and (base is None or fastest[0] < base):
            ratio = "" if base is None else f", {base / fastest[0]:.1f}× fewer"
            lines.append(f"REPRODUCED: BN reaches {target:.0%} in fewer steps: {fastest[1]} "
                         f"{fmt(fastest[0])} vs Baseline {fmt(base)}{ratio} (paper: BN-x5 "
                         "14× fewer).")
        else:
            lines.append(f"NOT REPRODUCED: no BN run reached {target:.0%} sooner than Baseline "
                         f"({fmt(base)} steps; "
                         + ", ".join(f"{n} {fmt(steps(n))}" for n in bn_names) + ").")
        if "BN-Baseline" in by and steps("BN-Baseline") is not None and base is not None:
            same = steps("BN-Baseline")
            word = "REPRODUCED" if base - same >= 50 else "NOT SHOWN (within noise)"
            lines.append(f"{word}: at the same rate (BN alone), BN-Baseline reaches {target:.0%}"
                         f" in {fmt(same)} steps vs Baseline {fmt(base)} "
                         f"({base / same:.1f}× fewer).")
        best = max(bn_names, key=final)
        lines.append(f"{higher(best, 'Baseline')}: BN ends higher: {best} "
                     f"{final(best):.3f} vs Baseline {final('Baseline'):.3f} (other BN runs: "
                     + ", ".join(f"{n} {final(n):.3f}" for n in bn_names if n != best) + ").")
    if "BN-x30" in by:
        if not fails("BN-x30") and final("BN-x30") >= target:
            lines.append(f"REPRODUCED: BN-x30 (lr {by['BN-x30']['learning_rate']:g}) trains "
                         f"stably, to {final('BN-x30'):.3f}.")
        else:
            lines.append("NOT REPRODUCED: BN-x30 did not train stably to the target.")
        if "BN-x5" in by:
            lines.append(f"{higher('BN-x30', 'BN-x5')}: the paper's BN-x30 ended above its "
                         f"BN-x5 (74.8% vs 73.0%); here {final('BN-x30'):.3f} vs "
                         f"{final('BN-x5'):.3f}.")
    for multiple in ("x5", "x30"):
        name, bn_name = f"Baseline-{multiple}", f"BN-{multiple}"
        if name not in by:
            continue
        rate = by[name]["learning_rate"]
        if fails(name):
            lines.append(f"REPRODUCED (the premise): without BN, lr {rate:g} fails: {name} ends "
                         f"at {final(name):.3f}{' (diverged)' if by[name]['diverged'] else ''}.")
        else:
            compare = (f"; {bn_name} {fmt(steps(bn_name))} steps, final {final(bn_name):.3f}"
                       if bn_name in by else "")
            lines.append(f"CAVEAT: without BN, lr {rate:g} works too: {name} reaches "
                         f"{target:.0%} in {fmt(steps(name))} steps, final {final(name):.3f}"
                         f"{compare}. At this rate the speed-up comes from the rate, not BN.")
    if {"BN-x5-Sigmoid", "Baseline-Sigmoid"} <= by.keys():
        if not fails("BN-x5-Sigmoid") and fails("Baseline-Sigmoid"):
            lines.append(f"REPRODUCED: with sigmoids, BN-x5-Sigmoid trains (final "
                         f"{final('BN-x5-Sigmoid'):.3f}) while Baseline-Sigmoid stays near "
                         f"chance ({final('Baseline-Sigmoid'):.3f}), as the paper's Inception "
                         "with sigmoids did.")
        else:
            lines.append(f"NOT REPRODUCED: BN-x5-Sigmoid final {final('BN-x5-Sigmoid'):.3f}, "
                         f"Baseline-Sigmoid final {final('Baseline-Sigmoid'):.3f}.")
        if "BN-x5" in by:
            gap = final("BN-x5") - final("BN-x5-Sigmoid")
            lines.append(f"{higher('BN-x5', 'BN-x5-Sigmoid')}: with BN, sigmoids end below "
                         f"ReLUs (paper: by 3.2 points); here by {100 * gap:.1f} points "
                         "(BN-x5 − BN-x5-Sigmoid).")
    if test_size:
        lines.append(f"Noise: one test image is {100 / test_size:.2f} accuracy points; with few "
                     f"seeds, accuracy gaps up to {100 * NOISE:g} point or step gaps under ~50 are "
                     "not evidence either way.")
    return lines


COLORS = {
    "Baseline": "tab:blue", "Baseline-x5": "tab:cyan", "Baseline-x30": "navy",
    "BN-Baseline": "tab:orange", "BN-x5": "tab:red", "BN-x30": "darkred",
    "BN-x5-Sigmoid": "tab:purple", "Baseline-Sigmoid": "tab:gray",
}


def plot(runs, results, rows, path: Path, *, target: float, dataset: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_row = {row["run"]: row for row in rows}
    sigmoid = [r for r in runs if r.activation == "sigmoid"]
    panels = [("ReLU networks", [r for r in runs if r.activation != "sigmoid"])]
    if sigmoid:
        panels.append(("sigmoid networks", sigmoid))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), sharey=True,
                             squeeze=False)
    for ax, (title, members) in zip(axes[0], panels, strict=True):
        for run in members:
            mine = [r for r in results if r.run == run.name]
            length = min(len(r.steps) for r in mine)
            curve = np.mean([r.accuracy[:length] for r in mine], axis=0)
            row = by_row[run.name]
            label = (f"{run.name} (lr {run.learning_rate:g}): "
                     f"{_steps_text(row['steps_to_target'])}")
            style = "--" if not run.batch_norm else "-"
            # step 0 (chance for every run) is left out: the step axis is logarithmic
            ax.plot(mine[0].steps[1:length], curve[1:], style, color=COLORS.get(run.name),
                    label=label, linewidth=1.4)
            if row["diverged"]:
                ax.plot(mine[0].steps[length - 1], curve[-1], "x", color=COLORS.get(run.name),
                        markersize=8)
        ax.axhline(target, color="black", linewidth=0.8, linestyle=":")
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log")
        ax.set_xlabel("training step (log scale)")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right", fontsize=7, bbox_to_anchor=(1.0, 0.2),
                  title=f"run (lr): steps to {target:.0%}, per seed", title_fontsize=7)
    axes[0][0].set_ylabel("test accuracy")
    seeds = len({r.seed for r in results})
    notes = [f"SGD momentum {MOMENTUM}", f"batch {BATCH_SIZE}"]
    if seeds > 1:
        notes.append(f"mean of {seeds} seeds")
    if any(r.diverged_at is not None for r in results):
        notes.append("× = diverged")
    notes.append(f"dotted: {target:.0%}")
    fig.suptitle(f"Small convnet on {dataset}: BN and higher learning rates "
                 f"({', '.join(notes)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --- command line ------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    names = [run.name for run in RUNS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000,
                        help="training steps per run (default 1000)")
    parser.add_argument("--eval-every", type=int, default=25,
                        help="steps between test-accuracy measurements (default 25)")
    parser.add_argument("--target", type=float, default=0.97,
                        help="test accuracy to reach (default 0.97)")
    parser.add_argument("--seeds", type=int, default=2,
                        help="runs per configuration, seeds 0..N-1 (default 2)")
    parser.add_argument("--runs", nargs="+", choices=names, default=names, metavar="RUN",
                        help=f"which runs (default all): {' '.join(names)}")
    parser.add_argument("--dataset", choices=_data.DATASETS, default="digits",
                        help="digits (bundled, offline; default) or mnist (downloads)")
    parser.add_argument("--out", type=Path, default=Path("out"),
                        help="where learning_rate.png and learning_rate.json go (default out/)")
    parser.add_argument("--quick", action="store_true",
                        help="a few steps of one seed, to check that everything runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.seeds = min(args.steps, 60), 20, 1
    if args.steps < args.eval_every or args.eval_every < 1 or args.seeds < 1:
        parser.error(f"need steps >= eval-every >= 1 and seeds >= 1. Received: --steps "
                     f"{args.steps} --eval-every {args.eval_every} --seeds {args.seeds}")
    if not 0.0 < args.target <= 1.0:
        parser.error(f"--target must be in (0, 1]. Received: {args.target}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    runs = [run for run in RUNS if run.name in args.runs]
    data = _data.load(args.dataset, seed=0)
    print(f"Data: {data.describe()}")
    print(f"SGD momentum {MOMENTUM}, batch {BATCH_SIZE}, constant learning rate (baseline "
          f"{BASE_LEARNING_RATE}), {args.steps} steps, seeds 0..{args.seeds - 1}")

    results = []
    for run in runs:
        for seed in range(args.seeds):
            result = train(run, data, steps=args.steps, eval_every=args.eval_every, seed=seed)
            reached = result.steps_to(args.target)
            print(f"  {run.name:<17} seed {seed}: {result.seconds:4.0f} s, final accuracy "
                  f"{result.accuracy[-1]:.3f}, {args.target:.0%} at step "
                  f"{'never' if reached is None else reached}"
                  f"{f', diverged at step {result.diverged_at}' if result.diverged_at else ''}")
            results.append(result)

    rows = table_rows(runs, results, args.target)
    print_table(rows, target=args.target, steps=args.steps)
    lines = verdict(rows, target=args.target, test_size=len(data.y_test))
    if lines:
        print("\nWhat reproduced (this run, this small task; one digits split, "
              f"{args.seeds} seed{'s' if args.seeds > 1 else ''}):")
        for line in lines:
            print(f"  - {line}")

    args.out.mkdir(parents=True, exist_ok=True)
    figure = plot(runs, results, rows, args.out / "learning_rate.png", target=args.target,
                  dataset=args.dataset)
    numbers = args.out / "learning_rate.json"
    numbers.write_text(json.dumps({
        "settings": {"dataset": args.dataset, "steps": args.steps, "target": args.target,
                     "batch_size": BATCH_SIZE, "momentum": MOMENTUM,
                     "base_learning_rate": BASE_LEARNING_RATE, "seeds": args.seeds},
        "table": rows,
        "verdict": lines,
        "results": [asdict(r) for r in results],
    }, indent=1))
    print(f"\nWrote {figure}, {numbers}")
    return {"rows": rows, "results": results, "verdict": lines, "figure": figure,
            "numbers": numbers}


if __name__ == "__main__":
    main()
