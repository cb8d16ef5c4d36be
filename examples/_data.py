"""The data every example uses: scikit-learn's bundled digits (offline) or MNIST (downloads).

`load("digits")` needs no network: 1,797 handwritten digits of 8×8 pixels, split once,
stratified, into 1,347 training and 450 test images. `load("mnist")` uses
`keras.datasets.mnist` (60,000 / 10,000 images of 28×28), which downloads on first use.

Images are standardized with statistics of the *training* images only (the test set never
leaks into them): one mean and standard deviation over all pixels (`per_feature=False`, keeps
an image's spatial structure, for convnets), or one per pixel (`per_feature=True`, for the
fully connected networks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

DATASETS = ("digits", "mnist")


@dataclass(frozen=True)
class Data:
    """A train/test split. Images are float32 `(n, height, width, 1)`, or `(n, height·width)`
    when loaded with `flat=True`; labels are int64 in [0, 10)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return 10

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.x_train)} training and {len(self.x_test)} test images, "
            f"input shape {self.input_shape}"
        )


def load(
    name: str = "digits", *, flat: bool = False, per_feature: bool = False, seed: int = 0
) -> Data:
    """Loads and standardizes `name` ("digits" or "mnist"); `seed` fixes the digits split."""
    if name == "digits":
        x_train, y_train, x_test, y_test = _digits(seed)
    elif name == "mnist":
        x_train, y_train, x_test, y_test = _mnist()
    else:
        raise ValueError(f"Unknown dataset: expected one of {DATASETS}. Received: {name!r}")
    x_train, x_test = standardize(x_train, x_test, per_feature=per_feature)
    if flat:
        x_train = x_train.reshape(len(x_train), -1)
        x_test = x_test.reshape(len(x_test), -1)
    return Data(
        name=name,
        x_train=x_train,
        y_train=y_train.astype(np.int64),
        x_test=x_test,
        y_test=y_test.astype(np.int64),
    )


def standardize(x_train, *others, per_feature=False):
    """Returns `(x_train, *others)` shifted and scaled by the training images' statistics.

    A pixel that is constant over the training set (digits' corners are always 0) keeps a
    scale of 1 rather than dividing by zero.
    """
    axis = 0 if per_feature else None
    mean = x_train.mean(axis=axis, keepdims=per_feature)
    std = x_train.std(axis=axis, keepdims=per_feature)
    std = np.where(std > 1e-6, std, 1.0)
    return tuple(((x - mean) / std).astype(np.float32) for x in (x_train, *others))


def _digits(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)[..., None]  # (1797, 8, 8, 1), values 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    return x_train, y_train, x_test, y_test


def _mnist():
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as error:  # no network, proxy, certificate, ...: say what to do instead
        raise SystemExit(
            "Could not load MNIST with keras.datasets.mnist (it downloads on first use): "
            f"{type(error).__name__}: {error}. Use --dataset digits, which needs no network."
        ) from error
    return (
        x_train.astype(np.float32)[..., None],
        y_train,
        x_test.astype(np.float32)[..., None],
        y_test,
    )


def batches(data: Data, batch_size: int, *, seed: int = 0):
    """An endless `tf.data` stream of shuffled training mini-batches of exactly `batch_size`
    (the same order for every model built with the same seed)."""
    import tensorflow as tf

    return (
        tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train))
        .shuffle(len(data.x_train), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size, drop_remainder=True)
        .prefetch(2)
    )


def train_steps(model, data: Data, *, batch_size: int, steps: int, measure_every: int, seed: int,
                callback) -> float:
    """Trains `model` for `steps` steps on the shuffled stream `batches(data, ...)`, as Keras
    epochs of `measure_every` steps, so that `callback` (a `keras.callbacks.Callback`) can
    measure at each epoch's end; returns the seconds it took."""
    start = time.perf_counter()
    model.fit(
        batches(data, batch_size, seed=seed),
        steps_per_epoch=measure_every,
        epochs=steps // measure_every,
        shuffle=False,  # the stream is shuffled already
        verbose=0,
        callbacks=[callback],
    )
    return time.perf_counter() - start


def accuracy(model, x, y, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `model` (in inference mode) on `(x, y)`."""
    correct = 0
    for start in range(0, len(x), batch_size):
        probabilities = model(x[start : start + batch_size], training=False)
        correct += int(np.sum(np.argmax(probabilities, axis=-1) == y[start : start + batch_size]))
    return correct / len(x)


