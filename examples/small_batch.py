"""BN's small-batch weakness, and what Batch Renormalization, ghost batches and population
statistics do about it, measured on scikit-learn's digits (offline).

BN normalizes with the batch's own mean and variance. With m values per channel those are
noisy for small m, and training (batch statistics) and inference (moving averages) disagree.
A fully connected network is used so that m is the batch size itself (a conv feature map would
add H·W positions per channel): batch sizes 2, 4, 8 and 32, each with

- "no BN": the same MLP with biases and no normalization;
- "BN": `kerasbn.BatchNormalization()` after each hidden layer, moving-average statistics;
- "BN+renorm": Batch Renormalization (Ioffe, 2017), rmax 3 and dmax 5 reached linearly over
  the first epoch (`renorm_warmup_steps`), as the paper relaxes them;
- "BN+ghost": ghost batches of k = max(2, batch/4) examples (`virtual_batch_size`); for
  batches of 2 and 4 that is k = 2, so at batch 2 it is plain BN;
- "BN+population": the "BN" run's weights, evaluated with population statistics
  (`kerasbn.population_statistics` over the training set at the training batch size, the
  paper's Algorithm 2) instead of its moving averages, at every measurement.

Every run: Adam (learning rate 1e-3), the same number of epochs whatever the batch size, the
same initial weights and example order per seed. Reported: final test accuracy, and the
training steps (and epochs) until the test accuracy first reaches `--target`.

    python examples/small_batch.py        # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import kerasbn_programs

kerasbn_programs.quiet_tensorflow_import()  # before anything imports TensorFlow

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _data
import keras
import numpy as np

import kerasbn

BATCH_SIZES = (2, 4, 8, 32)
METHODS = ("no BN", "BN", "BN+renorm", "BN+ghost", "BN+population")
TRAINED = METHODS[:4]  # BN+population is the BN run, evaluated otherwise
HIDDEN = 100
LEARNING_RATE = 1e-3
RENORM_CLIPPING = {"rmax": 3.0, "dmax": 5.0}
FIGURE = "small_batch.png"


def ghost_batch_size(batch_size: int) -> int:
    return max(2, batch_size // 4)


def batch_norm(method: str, batch_size: int, steps_per_epoch: int, name: str):
    if method == "BN+renorm":
        return kerasbn.BatchNormalization(
            renorm=True, renorm_clipping=RENORM_CLIPPING, renorm_warmup_steps=steps_per_epoch,
            name=name,
        )
    if method == "BN+ghost":
        return kerasbn.BatchNormalization(
            virtual_batch_size=ghost_batch_size(batch_size), name=name
        )
    return kerasbn.BatchNormalization(name=name)


def build_mlp(method: str, batch_size: int, steps_per_epoch: int, seed: int) -> keras.Model:
    """64 → 100 → 100 → 10, ReLU; with BN: dense (no bias) → BN → ReLU."""
    normalized = method != "no BN"
    inputs = keras.Input((64,), name="pixels")
    h = inputs
    for i in (1, 2):
        h = keras.layers.Dense(
            HIDDEN, use_bias=not normalized, name=f"dense{i}",
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + i),
        )(h)
        if normalized:
            h = batch_norm(method, batch_size, steps_per_epoch, f"batch_norm{i}")(h)
        h = keras.layers.ReLU(name=f"relu{i}")(h)
    outputs = keras.layers.Dense(
        10, activation="softmax", name="softmax",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 3),
    )(h)
    return keras.Model(inputs, outputs)


@dataclass
class Curve:
    """Test accuracy of one method at one batch size and seed, after `steps[i]` steps."""

    method: str
    batch_size: int
    seed: int
    steps: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    population_skipped: int = 0  # batches the population pass skipped (m < 2: a last batch of 1)

    def steps_to(self, target: float) -> int | None:
        return next((s for s, a in zip(self.steps, self.accuracy, strict=True) if a >= target),
                    None)


def population_accuracy(model, data, batch_size) -> tuple[float, int]:
    """Accuracy with population statistics; the model's own statistics are put back after,
    so that the BN curve (and training) are unaffected."""
    statistics = [w for w in model.non_trainable_weights]
    saved = [w.numpy() for w in statistics]
    try:
        report = kerasbn.population_statistics(model, data.x_train, batch_size=batch_size,
                                               verbose=0)
        return _data.accuracy(model, data.x_test, data.y_test), report.batches_skipped
    finally:
        for variable, value in zip(statistics, saved, strict=True):
            variable.assign(value)


class _Measure(keras.callbacks.Callback):
    """Measures test accuracy (and, for BN, with population statistics) every epoch slice."""

    def __init__(self, curves, data, batch_size, steps_per_measure):
        super().__init__()
        self.curves, self.data = curves, data
        self.batch_size, self.steps_per_measure = batch_size, steps_per_measure

    def on_train_begin(self, logs=None):
        self._record(0)

    def on_epoch_end(self, epoch, logs=None):
        self._record((epoch + 1) * self.steps_per_measure)

    def _record(self, step):
        moving, *population = self.curves
        moving.steps.append(step)
        moving.accuracy.append(_data.accuracy(self.model, self.data.x_test, self.data.y_test))
        if population:
            accuracy, skipped = population_accuracy(self.model, self.data, self.batch_size)
            population[0].steps.append(step)
            population[0].accuracy.append(accuracy)
            population[0].population_skipped = skipped


def train(method, data, *, batch_size, epochs, measures_per_epoch, seed) -> list[Curve]:
    """Trains one method; returns its curve (and the BN+population curve for BN)."""
    steps_per_epoch = len(data.x_train) // batch_size
    steps_per_measure = max(1, steps_per_epoch // measures_per_epoch)
    keras.utils.set_random_seed(seed)
    model = build_mlp(method, batch_size, steps_per_epoch, seed)
    model.compile(keras.optimizers.Adam(LEARNING_RATE), "sparse_categorical_crossentropy")
    curves = [Curve(method, batch_size, seed)]
    if method == "BN":
        curves.append(Curve("BN+population", batch_size, seed))
    seconds = _data.train_steps(
        model, data, batch_size=batch_size, steps=epochs * steps_per_epoch,
        measure_every=steps_per_measure, seed=seed,
        callback=_Measure(curves, data, batch_size, steps_per_measure),
    )
    for curve in curves:
        curve.seconds = seconds
    return curves


# --- reporting ---------------------------------------------------------------------------------


def table_rows(curves, target: float, train_size: int) -> list[dict]:
    rows = []
    for batch_size in sorted({c.batch_size for c in curves}):
        for method in METHODS:
            mine = [c for c in curves if (c.method, c.batch_size) == (method, batch_size)]
            if not mine:
                continue
            reached = [c.steps_to(target) for c in mine]
            rows.append({
                "batch_size": batch_size,
                "method": method,
                "final_accuracy": float(np.mean([c.accuracy[-1] for c in mine])),
                "steps_to_target": reached,  # one per seed, None = never
                "epochs_to_target": [None if s is None else s * batch_size / train_size
                                     for s in reached],
                "seeds": len(mine),
            })
    return rows


def _reached_text(row) -> str:
    return " / ".join("never" if s is None else f"{s} ({e:.1f} ep)"
                      for s, e in zip(row["steps_to_target"], row["epochs_to_target"],
                                      strict=True))


def table_text(rows, *, target: float, epochs: int) -> list[str]:
    seeds = rows[0]["seeds"]
    lines = [
        f"Test accuracy after {epochs} epochs{f' (mean of {seeds} seeds)' if seeds > 1 else ''}"
        f", and steps (epochs) to {target:.0%} test accuracy",
        f"| batch | {' | '.join(METHODS)} |",
        "|---|" + "---|" * len(METHODS),
    ]
    for batch_size in sorted({row["batch_size"] for row in rows}):
        cells = []
        for method in METHODS:
            row = next((r for r in rows if (r["batch_size"], r["method"]) == (batch_size, method)),
                       None)
            cells.append("–" if row is None else
                         f"{row['final_accuracy']:.3f}, {_reached_text(row)}")
        lines.append(f"| {batch_size} | {' | '.join(cells)} |")
    return lines


COLORS = {"no BN": "tab:gray", "BN": "tab:blue", "BN+renorm": "tab:red",
          "BN+ghost": "tab:green", "BN+population": "tab:purple"}


def plot(curves, path: Path, *, target: float, train_size: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_sizes = sorted({c.batch_size for c in curves})
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(3.4 * len(batch_sizes), 3.4),
                             sharey=True, squeeze=False)
    for ax, batch_size in zip(axes[0], batch_sizes, strict=True):
        for method in METHODS:
            mine = [c for c in curves if (c.method, c.batch_size) == (method, batch_size)]
            if not mine:
                continue
            length = min(len(c.steps) for c in mine)
            accuracy = np.mean([c.accuracy[:length] for c in mine], axis=0)
            epochs = np.asarray(mine[0].steps[:length]) * batch_size / train_size
            ax.plot(epochs, accuracy, "--" if method == "no BN" else "-",
                    color=COLORS[method], label=method, linewidth=1.3)
        ax.axhline(target, color="black", linewidth=0.8, linestyle=":")
        ax.set_title(f"batch {batch_size}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylim(0.5, 1.0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(loc="lower right", fontsize=7)
    seeds = len({c.seed for c in curves})
    fig.suptitle(f"MLP on digits: small batches (Adam {LEARNING_RATE:g}"
                 f"{f'; mean of {seeds} seeds' if seeds > 1 else ''}; dotted: {target:.0%})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --- command line ------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (default 6)")
    parser.add_argument("--measures-per-epoch", type=int, default=4,
                        help="test-accuracy measurements per epoch (default 4)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES),
                        metavar="N", help="batch sizes (default 2 4 8 32)")
    parser.add_argument("--methods", nargs="+", choices=TRAINED, default=list(TRAINED),
                        metavar="METHOD",
                        help=f"methods to train (default all; BN also gives BN+population): "
                             f"{', '.join(TRAINED)}")
    parser.add_argument("--target", type=_accuracy_target, default=0.95,
                        help="test accuracy to reach (default 0.95)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1)")
    parser.add_argument("--out", type=Path, default=Path("out"),
                        help=f"where {FIGURE} and small_batch.json go (default out/)")
    parser.add_argument("--quick", action="store_true",
                        help="one short epoch per run, to check that everything runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.measures_per_epoch = 1, 2
    if min(args.batch_sizes) < 2 or args.epochs < 1 or args.seeds < 1 or (
        args.measures_per_epoch < 1
    ):
        parser.error("need batch sizes >= 2 (BN needs two values per channel), epochs, seeds "
                     f"and measures >= 1. Received: --batch-sizes {args.batch_sizes} --epochs "
                     f"{args.epochs} --seeds {args.seeds} --measures-per-epoch "
                     f"{args.measures_per_epoch}")
    return args


def _accuracy_target(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]. Received: {text}")
    return value


def main(argv=None) -> dict:
    args = parse_args(argv)
    data = _data.load("digits", flat=True, per_feature=True)
    if args.quick:  # a fifth of the training set: one quick epoch
        data = _data.Data(data.name, data.x_train[:270], data.y_train[:270], data.x_test,
                          data.y_test)
    print(f"Data: {data.describe()}")
    print(f"MLP 64-{HIDDEN}-{HIDDEN}-10, Adam {LEARNING_RATE:g}, {args.epochs} epochs, "
          f"seeds 0..{args.seeds - 1}")
    curves = []
    for batch_size in args.batch_sizes:
        for method in args.methods:
            for seed in range(args.seeds):
                new = train(method, data, batch_size=batch_size, epochs=args.epochs,
                            measures_per_epoch=args.measures_per_epoch, seed=seed)
                for curve in new:
                    print(f"  batch {batch_size:>2} {curve.method:<14} seed {seed}: "
                          f"{curve.seconds:4.0f} s, final accuracy {curve.accuracy[-1]:.3f}")
                curves += new

    rows = table_rows(curves, args.target, len(data.x_train))
    table = table_text(rows, target=args.target, epochs=args.epochs)
    print("\n" + "\n".join(table))
    skipped = {c.batch_size: c.population_skipped for c in curves if c.method == "BN+population"}
    if any(skipped.values()):
        print("Population pass: batches skipped for m < 2 (a last batch of one example), per "
              f"batch size: {skipped}")

    args.out.mkdir(parents=True, exist_ok=True)
    figure = plot(curves, args.out / FIGURE, target=args.target, train_size=len(data.x_train))
    settings = {"epochs": args.epochs, "target": args.target, "seeds": args.seeds,
                "learning_rate": LEARNING_RATE, "renorm_clipping": RENORM_CLIPPING,
                "batch_sizes": args.batch_sizes}
    numbers = args.out / "small_batch.json"
    result = {"settings": settings, "table": rows, "curves": [asdict(c) for c in curves]}
    numbers.write_text(json.dumps(result, indent=1))
    print(f"\nWrote {figure}, {numbers}")
    return {**result, "rows": rows, "curves": curves, "table": table, "figure": figure}


if __name__ == "__main__":
    main()
