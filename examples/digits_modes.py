"""Train a small MLP and a small convnet with `kerasbn.BatchNormalization` on scikit-learn's
bundled digits (offline), and compare test accuracy with the two kinds of inference statistics:

- `statistics="moving_average"`: exponential moving averages kept during training (as Keras);
- `statistics="population"`: the paper's Algorithm 2, an unbiased estimate over every training
  batch since `reset_statistics()`. Here: after training, reset and run one training-mode pass
  over the training set with the final weights (no weight updates).

Run: `python examples/digits_modes.py [--epochs N]` (part of `make demo`).
"""

import kerasbn_programs

kerasbn_programs.quiet_tensorflow_import()  # before anything imports TensorFlow

import argparse

import _data
import keras

import kerasbn


def mlp(statistics):
    return keras.Sequential([
        keras.Input((64,)),
        *[layer for _ in range(2) for layer in (
            keras.layers.Dense(100, use_bias=False),
            kerasbn.BatchNormalization(statistics=statistics),
            keras.layers.Activation("sigmoid"),
        )],
        keras.layers.Dense(10, activation="softmax"),
    ], name=f"mlp_{statistics}")


def convnet(statistics):
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
        kerasbn.BatchNormalization(statistics=statistics),
        keras.layers.ReLU(),
        keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False),
        kerasbn.BatchNormalization(statistics=statistics),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10, activation="softmax"),
    ], name=f"convnet_{statistics}")


def population_pass(model, x, batch_size):
    """Algorithm 2 by hand with the layer alone: reset, then training-mode forward passes.

    Only the BN layers' statistics change: a forward call updates no trainable weight. (The
    model here has no dropout; `kerasbn.population_statistics` handles the general case.)
    """
    for layer in model.layers:
        if isinstance(layer, kerasbn.BatchNormalization):
            layer.reset_statistics()
    for start in range(0, len(x), batch_size):
        model(x[start:start + batch_size], training=True)


def train_and_evaluate(build, statistics, data, epochs, batch_size):
    keras.utils.set_random_seed(0)
    model = build(statistics)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(data.x_train, data.y_train, batch_size=batch_size, epochs=epochs, verbose=0)
    if statistics == "population":
        population_pass(model, data.x_train, batch_size)
    _, accuracy = model.evaluate(data.x_test, data.y_test, batch_size=256, verbose=0)
    return accuracy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    results = {}
    for name, build, flat in (("MLP", mlp, True), ("convnet", convnet, False)):
        data = _data.load("digits", flat=flat, per_feature=flat)
        for statistics in ("moving_average", "population"):
            results[name, statistics] = train_and_evaluate(
                build, statistics, data, args.epochs, args.batch_size
            )

    print(f"Digits, {args.epochs} epochs, batch {args.batch_size}: test accuracy")
    print(f"{'network':<10}{'moving_average':>16}{'population':>14}")
    for name in ("MLP", "convnet"):
        row = [results[name, s] for s in ("moving_average", "population")]
        print(f"{name:<10}{row[0]:>16.4f}{row[1]:>14.4f}")
    return results


if __name__ == "__main__":
    main()
