"""The data of a population pass, as batches of model inputs: Keras's public data types only.

`population_statistics` takes what `model.predict` takes: arrays (NumPy, TensorFlow tensors, or
anything with `__array__`, such as pandas, JAX or PyTorch CPU arrays; a list, tuple or dict of
them for several inputs), cut into batches of `batch_size`; or data batched already, whose
batches may be `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`: a `tf.data.Dataset`, a
`keras.utils.PyDataset` or any Python iterator (a generator). Only `x` is kept.

Everything here uses public API (`tf.data`, `keras.utils.PyDataset`'s documented methods,
`keras.utils.unpack_x_y_sample_weight`, `keras.tree`). Arrays are sliced in place, without
the copy into a `tf.data` pipeline: each batch is a view. A `PyDataset` is read in order in
this process, as `PyDataset` documents its `__getitem__`; its `workers` are not started, since
only Keras's internal data adapters run them.
"""

from __future__ import annotations

import collections.abc
import contextlib
import itertools

import keras
import numpy as np
import tensorflow as tf

# Keras's predict default, for arrays (datasets and generators are batched already).
DEFAULT_BATCH_SIZE = 32

_ACCEPTED = "arrays, a tf.data.Dataset, a Python generator or a keras.utils.PyDataset"


def check_data(data):
    """The one check on `data` that needs no look inside it: it is there."""
    if data is None:
        raise TypeError(
            f"`data` must be {_ACCEPTED} of the model's inputs. Received: data=None"
        )


def _model_inputs(batch):
    """x of a batch `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`."""
    return keras.utils.unpack_x_y_sample_weight(batch)[0]


def _reject_batch_size(data, batch_size):
    if batch_size is not None:
        raise ValueError(
            "`batch_size` is only for arrays: this data is batched already. Received: "
            f"batch_size={batch_size!r} with data of type {type(data).__name__}"
        )


def _reject_infinite(data, num_batches, steps):
    if num_batches is None and steps is None:
        raise ValueError(
            "`data` is infinite, so `steps` is needed to end the pass. Received: steps=None "
            f"with an infinite {type(data).__name__}"
        )


def _as_array(leaf):
    """A leaf of array data as something sliceable along its first axis, or None."""
    if tf.is_tensor(leaf) or isinstance(leaf, np.ndarray):
        return leaf
    if hasattr(leaf, "__array__") and not isinstance(leaf, (str, bytes)):
        return np.asarray(leaf)
    return None


def _arrays(data):
    """`data` as a structure of sliceable arrays, or None if it is not array data."""
    if not isinstance(data, (list, tuple, dict)) and _as_array(data) is None:
        return None
    leaves = keras.tree.flatten(data)
    arrays = [_as_array(leaf) for leaf in leaves]
    if not leaves or any(a is None or len(np.shape(a)) == 0 for a in arrays):
        return None
    return keras.tree.pack_sequence_as(data, arrays)


def _array_batches(arrays, batch_size):
    """(iterator of batches of `arrays`, number of batches)."""
    lengths = {int(np.shape(a)[0]) for a in keras.tree.flatten(arrays)}
    if len(lengths) != 1:
        raise ValueError(
            "Every input array must hold the same number of samples. Received: arrays of "
            f"lengths {sorted(lengths)}"
        )
    (length,) = lengths
    starts = range(0, length, batch_size)
    batches = (
        keras.tree.map_structure(lambda a, s=start: a[s : s + batch_size], arrays)
        for start in starts
    )
    return batches, len(starts)


def _py_dataset_batches(data):
    """The batches of a PyDataset, in order (`num_batches` None: endless)."""
    indices = itertools.count() if data.num_batches is None else range(data.num_batches)
    for index in indices:
        yield data[index]


@contextlib.contextmanager
def model_input_batches(data, batch_size, steps):
    """Yields (iterator of the model inputs of each batch, number of batches or None).

    Raises `ValueError` for `batch_size` with batched data or endless data without `steps`,
    `TypeError` for data of another type; both before any batch is read. Python generators
    and PyDatasets are read in Python, not through tf.data: inside tf.data a
    KeyboardInterrupt raised by the generator would become a TensorFlow error.
    """
    if isinstance(data, tf.data.Dataset):
        _reject_batch_size(data, batch_size)
        cardinality = int(data.cardinality())
        if cardinality == tf.data.INFINITE_CARDINALITY:
            _reject_infinite(data, None, steps)
        yield map(_model_inputs, data), (cardinality if cardinality >= 0 else None)
    elif isinstance(data, keras.utils.PyDataset):
        _reject_batch_size(data, batch_size)
        _reject_infinite(data, data.num_batches, steps)
        data.on_epoch_begin()
        try:
            yield map(_model_inputs, _py_dataset_batches(data)), data.num_batches
        finally:
            data.on_epoch_end()
    elif isinstance(data, collections.abc.Iterator):
        _reject_batch_size(data, batch_size)
        yield map(_model_inputs, data), None
    elif (arrays := _arrays(data)) is not None:
        # Arrays are x only, as for predict: a tuple of two arrays is two inputs.
        yield _array_batches(arrays, batch_size or DEFAULT_BATCH_SIZE)
    else:
        raise TypeError(f"`data` must be {_ACCEPTED}. Received: data of type {type(data).__name__}")


def describe_inputs(x):
    """Shapes of a batch's inputs, for error messages."""
    return tf.nest.map_structure(lambda t: tuple(np.shape(t)), x)
