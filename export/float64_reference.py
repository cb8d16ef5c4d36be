"""The Keras model computing in float64: the exact function a float32 export approximates.

Verification compares ONNX Runtime with the Keras model in its own dtype, which is itself only
an approximation: in a deep network float32 rounding compounds, and on some models Keras's
float32 result is as far from the same model in float64 as any other float32 implementation
can be (a random ResNet101 at 32×32: 1.8e-3 on logits of 7, beyond a tolerance of 1e-4 of the
largest logit). When a comparison fails, `verification` asks this module how large that error
of Keras's own is, and judges ONNX Runtime against the float64 model with that allowance.
"""

from __future__ import annotations

import keras
import numpy as np


def float64_twin(model):
    """`model`'s architecture and weights with every layer computing in float64.

    Built from the model's config with each dtype policy set to "float64" (Keras rebuilds
    Sequential and functional models, and layers, from it), then given the model's weights.
    Raises whatever `from_config` or `set_weights` raise for a model that cannot be rebuilt
    (a subclassed model without `get_config`, say); the caller decides what that means.
    """
    twin = model.__class__.from_config(_with_float64_policies(model.get_config()))
    twin.set_weights([np.asarray(w, dtype=_float64_if_float(w)) for w in model.get_weights()])
    return twin


def _with_float64_policies(config):
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy":
            return {**config, "config": {**config["config"], "name": "float64"}}
        if config.get("class_name") == "InputLayer" and "float" in str(
            config.get("config", {}).get("dtype")
        ):  # an input's dtype is a plain name: a float input is made float64 too
            return {**config, "config": {**config["config"], "dtype": "float64"}}
        return {key: _with_float64_policies(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_with_float64_policies(item) for item in config]
    return config


def _float64_if_float(value):
    name = keras.backend.standardize_dtype(value.dtype)
    return "float64" if "float" in name else name
