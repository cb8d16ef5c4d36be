"""The paper's Figure 1 (Ioffe & Szegedy, 2015, §4.1) at small scale.

Two networks with 3 fully connected hidden layers of 100 sigmoid units each and a 10-way
softmax, trained with cross-entropy by plain SGD on mini-batches of 60, from the same small
random Gaussian initial weights, on the same batches in the same order. The second network
has a `kerasbn.BatchNormalization` before each sigmoid (z = sigmoid(BN(Wu)), no bias:
BN's beta takes its place); the first computes z = sigmoid(Wu + b).

Recorded every `--eval-every` steps, in inference mode (so the BN network uses its moving
averages, as it would when deployed):
  (a) test accuracy;
  (b, c) the 15th, 50th and 85th percentiles of the input to one sigmoid of the last hidden
      layer (Wu + b without BN, BN(Wu) with it) over a fixed batch of test images.

The paper trains 50,000 steps on MNIST; the default here is 8,000 steps on scikit-learn's
bundled 8×8 digits (no network needed). `--dataset mnist` downloads MNIST.

    python examples/paper_mnist.py                 # digits, ~1-3 minutes on 2 CPU cores
    python examples/paper_mnist.py --dataset mnist --steps 50000
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

HIDDEN_LAYERS = 3
UNITS = 100
BATCH_SIZE = 60  # the paper's
PERCENTILES = (15, 50, 85)  # the paper's
# Plain SGD at a learning rate where the network without BN does learn, but slowly: with these
# small initial weights the gradient reaching the first layers through three sigmoids is tiny.
LEARNING_RATE = 0.1
INIT_STDDEV = 0.1
PROBE_LAYER = f"sigmoid{HIDDEN_LAYERS}"


@dataclass
class Record:
    """What one network's training produced; lists are aligned with `steps`."""

    name: str
    steps: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    # percentiles[i] = (p15, p50, p85) of the probed sigmoid's input at steps[i]
    percentiles: list[tuple[float, float, float]] = field(default_factory=list)
    # for every sigmoid of the last hidden layer: max − min of its median input over the
    # measurements after the first 10% of training
    unit_median_range: list[float] = field(default_factory=list)
    seconds: float = 0.0


def build_mlp(input_dim: int, *, batch_norm: bool, seed: int) -> keras.Model:
    """The paper's network. Layer i's kernel is drawn from N(0, INIT_STDDEV²) with seed + i,
    so the networks with and without BN start from the same weights."""
    inputs = keras.Input((input_dim,), name="pixels")
    h = inputs
    for i in range(1, HIDDEN_LAYERS + 1):
        init = keras.initializers.RandomNormal(stddev=INIT_STDDEV, seed=seed + i)
        h = keras.layers.Dense(UNITS, use_bias=not batch_norm, kernel_initializer=init,
                               name=f"dense{i}")(h)
        if batch_norm:
            h = kerasbn.BatchNormalization(name=f"batch_norm{i}")(h)
        h = keras.layers.Activation("sigmoid", name=f"sigmoid{i}")(h)
    init = keras.initializers.RandomNormal(stddev=INIT_STDDEV, seed=seed + HIDDEN_LAYERS + 1)
    outputs = keras.layers.Dense(10, activation="softmax", kernel_initializer=init,
                                 name="softmax")(h)
    return keras.Model(inputs, outputs, name="bn_mlp" if batch_norm else "mlp")


class _Recorder(keras.callbacks.Callback):
    """Evaluates at the start and after every 'epoch' (= `eval_every` steps)."""

    def __init__(self, record: Record, data: _data.Data, probe_x, unit: int, eval_every: int):
        super().__init__()
        self.record, self.data, self.probe_x = record, data, probe_x
        self.unit, self.eval_every = unit, eval_every

    def on_train_begin(self, logs=None):
        self.probe = keras.Model(self.model.input, self.model.get_layer(PROBE_LAYER).input)
        self.medians = []
        self._measure(0)

    def on_epoch_end(self, epoch, logs=None):
        self._measure((epoch + 1) * self.eval_every)

    def _measure(self, step):
        pre_activation = np.asarray(self.probe(self.probe_x, training=False))
        self.medians.append(np.median(pre_activation, axis=0))
        self.record.steps.append(step)
        self.record.accuracy.append(_data.accuracy(self.model, self.data.x_test, self.data.y_test))
        self.record.percentiles.append(
            tuple(float(p) for p in np.percentile(pre_activation[:, self.unit], PERCENTILES))
        )

    def on_train_end(self, logs=None):
        later = np.array(self.medians[_settled(len(self.medians)):])
        self.record.unit_median_range = (later.max(axis=0) - later.min(axis=0)).tolist()


def train(data: _data.Data, *, batch_norm: bool, steps: int, eval_every: int, unit: int,
          probe_x, seed: int) -> Record:
    keras.utils.set_random_seed(seed)
    model = build_mlp(data.input_shape[0], batch_norm=batch_norm, seed=seed)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
    )
    record = Record("with BN" if batch_norm else "without BN")
    record.seconds = _data.train_steps(
        model, data, batch_size=BATCH_SIZE, steps=steps, measure_every=eval_every, seed=seed,
        callback=_Recorder(record, data, probe_x, unit, eval_every),
    )
    return record


# --- reporting ---------------------------------------------------------------------------------


def first_step_reaching(record: Record, target: float) -> int | None:
    for step, accuracy in zip(record.steps, record.accuracy, strict=True):
        if accuracy >= target:
            return step
    return None


def print_numbers(base: Record, bn: Record, rows: int = 11) -> None:
    idx = np.unique(np.linspace(0, len(base.steps) - 1, rows).round().astype(int))
    print("\n(a) test accuracy and (b, c) the probed sigmoid's input: 15th / 50th / 85th "
          "percentiles")
    print(f"{'step':>7} | {'acc w/o BN':>10} {'acc BN':>7} | {'w/o BN p15 / p50 / p85':>24} | "
          f"{'BN p15 / p50 / p85':>24}")
    for i in idx:
        pb, pn = base.percentiles[i], bn.percentiles[i]
        print(f"{base.steps[i]:>7} | {base.accuracy[i]:>10.3f} {bn.accuracy[i]:>7.3f} | "
              f"{pb[0]:>7.2f} {pb[1]:>7.2f} {pb[2]:>7.2f}    | "
              f"{pn[0]:>7.2f} {pn[1]:>7.2f} {pn[2]:>7.2f}")


def _settled(count: int) -> int:
    """Index of the first measurement after the first 10% of training. Until then the BN
    network's moving averages are still warming up from their initial values (0 and 1), so
    its inference-mode inputs to the sigmoid are not yet normalized."""
    return max(1, count // 10)


def summarize(base: Record, bn: Record) -> dict:
    """The claims of Figure 1 as numbers."""
    best = max(base.accuracy)
    summary = {"baseline_best_accuracy": best, "final_accuracy": {},
               "steps_to_baseline_best": {}, "percentile_change": {},
               "mean_unit_median_range": {}}
    for record in (base, bn):
        start = _settled(len(record.steps))
        summary["settled_step"] = record.steps[start]
        summary["final_accuracy"][record.name] = record.accuracy[-1]
        summary["steps_to_baseline_best"][record.name] = first_step_reaching(record, best)
        summary["percentile_change"][record.name] = [
            end - begin for begin, end in
            zip(record.percentiles[start], record.percentiles[-1], strict=True)
        ]
        summary["mean_unit_median_range"][record.name] = float(np.mean(record.unit_median_range))
    return summary


def print_summary(summary: dict, unit: int) -> None:
    final, reach = summary["final_accuracy"], summary["steps_to_baseline_best"]
    change, spread = summary["percentile_change"], summary["mean_unit_median_range"]
    best, settled = summary["baseline_best_accuracy"], summary["settled_step"]
    print("\nSummary")
    for name in final:
        print(f"  {name:>10}: final test accuracy {final[name]:.3f}; first reaches the best "
              f"accuracy without BN ({best:.3f}) at step {reach[name]}")
    print(f"  sigmoid {unit} of the last hidden layer: change of its input's 15th / 50th / 85th "
          f"percentiles from step {settled} to the end:")
    for name, delta in change.items():
        print(f"  {name:>10}: " + " / ".join(f"{d:+.2f}" for d in delta))
    print(f"  all {UNITS} sigmoids of that layer: range of each one's median input from step "
          f"{settled} on, mean over units: "
          + ", ".join(f"{name} {value:.2f}" for name, value in spread.items()))


def plot(base: Record, bn: Record, out: Path, *, dataset: str, unit: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"without BN": "tab:blue", "with BN": "tab:red"}
    setting = f"{dataset}, SGD lr={LEARNING_RATE}, batch {BATCH_SIZE}"

    fig, ax = plt.subplots(figsize=(6, 4))
    for record in (base, bn):
        ax.plot(record.steps, record.accuracy, color=colors[record.name], label=record.name)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(max(0.0, min(base.accuracy + bn.accuracy) - 0.02), 1.0)
    ax.set_title(f"(a) Test accuracy, 3×100 sigmoid MLP\n({setting})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    accuracy_png = out / "paper_mnist_accuracy.png"
    fig.savefig(accuracy_png, dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, record, letter in zip(axes, (base, bn), "bc", strict=True):
        values = np.array(record.percentiles)
        for k, style in enumerate((":", "-", "--")):
            ax.plot(record.steps, values[:, k], style, color=colors[record.name])
        ax.set_title(f"({letter}) {record.name}", fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"input to sigmoid {unit} of hidden layer {HIDDEN_LAYERS}")
    fig.suptitle("Distribution of a last-hidden-layer sigmoid's input over training "
                 f"(fixed test batch, {dataset}, inference mode)", fontsize=10)
    handles = [plt.Line2D([], [], linestyle=style, color="black", label=f"{q}th percentile")
               for q, style in zip(PERCENTILES, (":", "-", "--"), strict=True)]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    percentiles_png = out / "paper_mnist_sigmoid_input.png"
    fig.savefig(percentiles_png, dpi=90)
    plt.close(fig)
    return [accuracy_png, percentiles_png]


# --- command line ------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8000,
                        help="training steps per network (default 8000; the paper: 50000)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="steps between measurements (default: steps / 100)")
    parser.add_argument("--dataset", choices=_data.DATASETS, default="digits",
                        help="digits (bundled, offline; default) or mnist (downloads)")
    parser.add_argument("--unit", type=int, default=0,
                        help="which last-hidden-layer sigmoid to follow (default 0)")
    parser.add_argument("--probe-size", type=int, default=450,
                        help="size of the fixed test batch for the percentiles (default 450)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"),
                        help="where the PNGs and paper_mnist.json go (default out/)")
    parser.add_argument("--quick", action="store_true",
                        help="a few hundred steps, to check that everything runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 200)
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 100)
    if args.steps < args.eval_every or args.eval_every < 1:
        parser.error(f"need steps >= eval-every >= 1. Received: --steps {args.steps} "
                     f"--eval-every {args.eval_every}")
    if not 0 <= args.unit < UNITS:
        parser.error(f"--unit must be in [0, {UNITS}). Received: {args.unit}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    data = _data.load(args.dataset, flat=True, per_feature=True, seed=args.seed)
    probe_x = data.x_test[: args.probe_size]
    print(f"Data: {data.describe()}")
    print(f"Network: {HIDDEN_LAYERS}×{UNITS} sigmoid, init N(0, {INIT_STDDEV}²), SGD "
          f"learning rate {LEARNING_RATE}, batch {BATCH_SIZE}, {args.steps} steps; "
          f"percentiles over {len(probe_x)} fixed test images")

    records = []
    for batch_norm in (False, True):
        record = train(data, batch_norm=batch_norm, steps=args.steps, eval_every=args.eval_every,
                       unit=args.unit, probe_x=probe_x, seed=args.seed)
        print(f"  trained {record.name:>10}: {record.seconds:.0f} s, final test accuracy "
              f"{record.accuracy[-1]:.3f}")
        records.append(record)
    base, bn = records

    print_numbers(base, bn)
    summary = summarize(base, bn)
    print_summary(summary, args.unit)

    args.out.mkdir(parents=True, exist_ok=True)
    figures = plot(base, bn, args.out, dataset=args.dataset, unit=args.unit)
    numbers = args.out / "paper_mnist.json"
    numbers.write_text(json.dumps({
        "settings": {"dataset": args.dataset, "steps": args.steps, "batch_size": BATCH_SIZE,
                     "learning_rate": LEARNING_RATE, "init_stddev": INIT_STDDEV,
                     "unit": args.unit, "probe_size": len(probe_x), "seed": args.seed},
        "summary": summary,
        "records": [asdict(r) for r in records],
    }, indent=1))
    print("\nWrote " + ", ".join(str(p) for p in [*figures, numbers]))
    return {"records": records, "summary": summary, "figures": figures, "numbers": numbers}


if __name__ == "__main__":
    main()
