"""A Keras model's inputs and outputs as the ONNX file names them, and example batches for them.

ONNX inputs are named after the model's input layers and outputs after its output layers
(numbered `_1`, `_2`, … where two share a name), in the order of `model.inputs` and
`model.outputs`.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import keras
import numpy as np

from kerasbn import _keras_compat


@dataclass(frozen=True)
class InputSpec:
    """One model input: its ONNX name, its shape (batch first, None where unknown), its dtype."""

    name: str
    shape: tuple
    dtype: str


def check_model(model):
    """TypeError unless `model` is a Keras model; ValueError unless its inputs are defined."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a Keras model. Received: model={model!r}")
    input_specs(model)


def input_specs(model):
    try:
        tensors = model.inputs
    except AttributeError:
        tensors = None
    if not tensors:
        raise ValueError(
            "The model has no defined inputs: build it (`model.build(shape)`) or give it an "
            f"`keras.Input`. Received: model={model.name!r}"
        )
    names = _unique([_keras_compat.layer_name(t) for t in tensors])
    return [InputSpec(n, tuple(t.shape), str(t.dtype)) for n, t in zip(names, tensors, strict=True)]


def output_names(model):
    return _unique([_keras_compat.layer_name(t) for t in model.outputs])


def _unique(names):
    seen = {}
    result = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        result.append(name if count == 0 else f"{name}_{count}")
    return result


def pack(model, tensors):
    """The flat list `tensors`, in input order, in the structure `model` is called with."""
    return _keras_compat.pack_inputs(model, tensors)


# --- example batches ---------------------------------------------------------------------------

_RANDOM_SEED = 0


@dataclass(frozen=True)
class Batch:
    """Examples to run: `source` is "samples" (the caller's) or "random"; `arrays` one per
    input, in input order, batch first."""

    source: str
    arrays: list

    def __len__(self):
        return len(self.arrays[0])


def example_batches(specs, samples, random_samples=None):
    """The `Batch`es to run: `samples`, then `random_samples` standard-normal examples (by
    default 8 without `samples`, none with them: real inputs are what the model is for, and a
    deep model fed far outside its range can be so ill-conditioned that float32 is noise there).
    A dimension the model leaves open takes its size from `samples`."""
    if random_samples is None:
        random_samples = 8 if samples is None else 0
    if isinstance(random_samples, bool) or not isinstance(random_samples, numbers.Integral) or (
        random_samples < 0
    ):
        raise ValueError(
            "`random_samples` must be an integer >= 0 or None. "
            f"Received: random_samples={random_samples!r}"
        )
    given = None if samples is None else sample_arrays(specs, samples)
    batches = [] if given is None else [Batch("samples", given)]
    if random_samples:
        rng = np.random.default_rng(_RANDOM_SEED)
        arrays = [
            _random_array(rng, spec, random_samples, None if given is None else given[k])
            for k, spec in enumerate(specs)
        ]
        batches.append(Batch("random", arrays))
    return batches


def sample_arrays(specs, samples, argument="samples"):
    """`samples` (an array, a list or tuple of arrays in input order, or a dict by input name)
    as a list of arrays in input order (`input_arrays`), checked as one batch (`check_batch`);
    ValueError or TypeError naming `argument`."""
    arrays = input_arrays(specs, samples, argument)
    check_batch(specs, arrays, argument)
    return arrays


def input_arrays(specs, samples, argument="samples"):
    """`samples` as a list of arrays in input order, each cast to its input's dtype: one per
    input of a list or tuple or of a dict by input name, or `samples` itself for a one-input
    model (also a nested list of numbers). ValueError/TypeError naming `argument`."""
    names = [spec.name for spec in specs]
    if isinstance(samples, Mapping):
        missing = sorted(set(names) - set(samples))
        if missing:
            raise ValueError(
                f"`{argument}` lacks the inputs {missing}. "
                f"Received: {argument} keys={sorted(samples)}"
            )
        arrays = [samples[n] for n in names]
    elif isinstance(samples, (list, tuple)) and (
        len(specs) > 1 or all(hasattr(a, "shape") for a in samples)
    ):
        # One array per input, in input order; for a one-input model too, when the list holds
        # arrays (`[x]`, or the `(x,)` of a data pipeline), not numbers.
        arrays = list(samples)
    else:
        arrays = [samples]
    if len(arrays) != len(specs):
        raise ValueError(
            f"`{argument}` must hold one array per model input ({names}). "
            f"Received: {len(arrays)} arrays"
        )
    try:
        return [np.asarray(a, dtype=s.dtype) for a, s in zip(arrays, specs, strict=True)]
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"`{argument}` must hold numeric arrays. Received: {argument}={samples!r:.80}"
        ) from error


def check_batch(specs, arrays, argument="samples"):
    """ValueError naming `argument` unless `arrays` (one per input, in input order) fit their
    inputs' shapes and are one batch of at least one example."""
    for array, spec in zip(arrays, specs, strict=True):
        fits = array.ndim == len(spec.shape) and all(
            d is None or d == s for d, s in zip(spec.shape[1:], array.shape[1:], strict=True)
        )
        if not fits:
            raise ValueError(
                f"`{argument}` for input {spec.name!r} must have shape {spec.shape}. "
                f"Received: shape={array.shape}"
            )
    sizes = [len(a) for a in arrays]
    if len(set(sizes)) != 1:
        raise ValueError(
            f"`{argument}` must have one batch size for all inputs. Received: batch sizes={sizes}"
        )
    if sizes[0] == 0:
        raise ValueError(
            f"`{argument}` holds no examples (0 rows). Received: shapes="
            f"{[a.shape for a in arrays]}"
        )


def _random_array(rng, spec, count, like):
    shape = [count]
    for axis, size in enumerate(spec.shape[1:], start=1):
        if size is None and like is None:
            raise ValueError(
                f"Input {spec.name!r} has the unknown dimension {axis} (shape {spec.shape}): pass "
                "`samples` so that verification has a shape to test. Received: samples=None"
            )
        shape.append(like.shape[axis] if size is None else size)
    if np.issubdtype(np.dtype(spec.dtype), np.integer):
        # Token ids and the like: 0 and 1 are valid for any vocabulary.
        return rng.integers(0, 2, size=shape).astype(spec.dtype)
    return rng.standard_normal(shape).astype(spec.dtype)
