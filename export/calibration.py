"""Calibration data: what a user passes as `calibration` (or `samples`) read as ONNX feeds.

Int8 quantization (`kerasbn.export.quantize`) chooses each activation's range from the values it
takes on example inputs; this module reads those inputs in every form `model.predict` takes and
checks them against the model's inputs (`kerasbn.export.signature`) before anything runs.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping

import keras
import numpy as np

from kerasbn.export import signature

# Calibration and verification run ONNX Runtime on batches of this many examples: large enough
# to amortize a call, small enough that the calibrator's copy of every activation stays modest.
BATCH = 32


class CalibrationError(ValueError):
    """`calibration` (or `samples` of an int8 export) cannot be read as the model's inputs."""


def calibration_feeds(data, specs, *, max_samples, name="calibration"):
    """`data` as a list of ONNX feed dicts of at most `BATCH` examples, `max_samples` in all.

    Accepted forms of `data` (batch first, as `model.predict` takes them):
        * an array: the one input of a one-input model;
        * a list or tuple of arrays, one per model input in the order of `model.inputs`;
        * a dict from input name to array;
        * a `tf.data.Dataset`, generator, or any other iterable of batches, each one of the
          forms above or an `(x, y)` / `(x, y, sample_weight)` tuple whose `x` is (as Keras
          unpacks a dataset's elements: a multi-input model's `x` is a tuple or dict inside
          it). An element without the batch axis (an unbatched dataset) is one example.
    A stream is read only until `max_samples` examples are in (None: all of it), so an endless
    generator or a repeated dataset is fine. Arrays are cast to the input's dtype.

    `specs` are the model's `signature.InputSpec`s.

    Raises:
        TypeError: `data` is None, a string, a number or another non-data object.
        CalibrationError: arrays that do not fit the inputs (count, names, shape, batch sizes),
            non-finite values, or no examples at all.
    """
    if data is None or isinstance(data, (str, bytes, numbers.Number)):
        raise TypeError(
            f"`{name}` must be an array, a list or dict of arrays, a tf.data.Dataset or an "
            f"iterable of batches. Received: {name}={data!r}"
        )
    if _is_batch(data):
        batches = [_batch_arrays(data, specs, name)]
    elif isinstance(data, Iterable):
        batches = _read_stream(data, specs, max_samples, name)
    else:
        raise TypeError(
            f"`{name}` must be an array, a list or dict of arrays, a tf.data.Dataset or an "
            f"iterable of batches. Received: {name} of type {type(data).__name__}"
        )
    batches = [arrays for arrays in batches if arrays is not None]
    if not batches:
        raise CalibrationError(f"`{name}` holds no examples. Received: {_describe(data)}")
    arrays = [np.concatenate(column) for column in zip(*batches, strict=True)]
    if max_samples is not None:
        arrays = [a[:max_samples] for a in arrays]
    for spec, array in zip(specs, arrays, strict=True):
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise CalibrationError(
                f"`{name}` for input {spec.name!r} holds NaN or infinite values, which would "
                "make its int8 range meaningless. Received: "
                f"{int((~np.isfinite(array)).sum())} non-finite of {array.size} values"
            )
    return [
        {spec.name: array[start:start + BATCH] for spec, array in zip(specs, arrays, strict=True)}
        for start in range(0, len(arrays[0]), BATCH)
    ]


def _is_batch(data):
    """Data itself (an array, or arrays per input), as opposed to a stream of batches."""
    if isinstance(data, Mapping) or _is_array(data):
        return True
    return isinstance(data, (list, tuple)) and all(_is_array(item) for item in data) and bool(data)


def _is_array(value):
    # NumPy arrays, tf.Tensor, Keras/JAX/Torch tensors: whatever NumPy can take as an array.
    return isinstance(value, np.ndarray) or (
        hasattr(value, "__array__") and hasattr(value, "shape")
    )


def _read_stream(stream, specs, max_samples, name):
    batches, total = [], 0
    for element in stream:
        x = element
        if isinstance(element, (list, tuple)):
            if not 1 <= len(element) <= 3:
                raise CalibrationError(
                    f"A batch of `{name}` given as a tuple must be (x,), (x, y) or "
                    f"(x, y, sample_weight). Received: a tuple of {len(element)} items"
                )
            x = keras.utils.unpack_x_y_sample_weight(element)[0]
        arrays = _batch_arrays(x, specs, name, unbatched_ok=True)
        batches.append(arrays)
        total += 0 if arrays is None else len(arrays[0])
        if max_samples is not None and total >= max_samples:
            break
    return batches


def _batch_arrays(x, specs, name, *, unbatched_ok=False):
    """One batch `x` as a list of arrays in the order of `specs` (`signature.input_arrays`),
    checked against them (`signature.check_batch`); with `unbatched_ok` an array without the
    batch axis is one example. None for a batch of 0 examples."""
    try:
        arrays = signature.input_arrays(specs, x, argument=name)
        if unbatched_ok:
            arrays = [
                array[np.newaxis] if array.ndim == len(spec.shape) - 1 else array
                for array, spec in zip(arrays, specs, strict=True)
            ]
        if all(array.ndim > 0 and len(array) == 0 for array in arrays):
            return None  # an empty batch in a stream; all of `data` empty is reported once
        signature.check_batch(specs, arrays, argument=name)
    except ValueError as error:
        raise CalibrationError(str(error)) from error
    return arrays


def _describe(data):
    shape = getattr(data, "shape", None)
    return f"{type(data).__name__} of shape {tuple(shape)}" if shape is not None else (
        f"an empty {type(data).__name__}"
    )


def example_count(feeds):
    """How many examples a list of feed dicts holds."""
    return sum(len(next(iter(feed.values()))) for feed in feeds)
