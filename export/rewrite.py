"""Build the folded model from a `FoldPlan`: a new model, never the user's.

Every layer is cloned from its config (nested models recursively; a shared layer stays shared),
the folded BN layers are left out, and the clones get copied or folded weights once all are
built, so the new model never shares a variable with the original.
"""

from __future__ import annotations

import keras

from kerasbn import _keras_compat


def rebuild(model, plan):
    """A new model like `model` without the BN layers `plan` removes, with its new weights."""
    return _Rebuilder(plan).rebuild(model)


class _Bypass:
    """Stands for a folded BN while the new graph is built: calling it returns its input."""


def _call(layer, *args, **kwargs):
    if isinstance(layer, _Bypass):
        return args[0] if args else kwargs["inputs"]
    return layer(*args, **kwargs)


def _new_input(tensor):
    """A fresh Input like `tensor`, named after its InputLayer (clone_model would name it after
    the tensor, and input names reach the ONNX graph)."""
    return keras.Input(
        batch_shape=tensor.shape, dtype=tensor.dtype, name=_keras_compat.layer_name(tensor)
    )


class _Rebuilder:
    """Builds the folded model from a plan: clones every layer (nested models recursively),
    leaves out the folded BN layers, then loads copied or folded weights."""

    def __init__(self, plan):
        self.plan = plan
        self.clones = {}  # id(old layer) -> new layer: a shared layer stays shared
        self.pairs = []  # (old, new) layers whose weights are loaded once all are built

    def rebuild(self, model):
        new_model = self._clone(model)
        for old, new in self.pairs:
            self._load_weights(old, new)
        return new_model

    def _clone(self, layer):
        if id(layer) not in self.clones:
            self.clones[id(layer)] = self._new_layer(layer)
        return self.clones[id(layer)]

    def _new_layer(self, layer):
        if id(layer) in self.plan.removed:
            return _Bypass()
        if not isinstance(layer, keras.layers.Layer):
            # A raw operation in a functional graph (`keras.ops.add`, the `NotEqual` behind a
            # Masking layer's mask): it holds no state, so the new graph can call it as it is.
            return layer
        if isinstance(layer, keras.Sequential):
            return self._rebuild_sequential(layer)
        if _keras_compat.is_functional(layer):
            return keras.models.clone_model(
                layer,
                input_tensors=keras.tree.map_structure(_new_input, layer.input),
                clone_function=self._clone,
                call_function=_call,
            )
        try:
            config = layer.get_config()
            if id(layer) in self.plan.weights:
                config["use_bias"] = True  # a fold always gives the layer a bias
            if id(layer) in self.plan.activations:
                config["activation"] = self.plan.activations[id(layer)]
            new = _keras_compat.layer_from_config(type(layer), config)
        except Exception as error:  # noqa: BLE001  (a layer's get_config/from_config raise anything)
            raise TypeError(
                f"Layer '{layer.name}' ({type(layer).__name__}) cannot be rebuilt from its "
                "config, and folding builds a new model from every layer's config (as "
                f"keras.models.clone_model does): {error}. Received: layer={layer!r}"
            ) from error
        self.pairs.append((layer, new))
        return new

    def _rebuild_sequential(self, model):
        layers = [self._clone(layer) for layer in model.layers]
        new = keras.Sequential(
            [
                _new_input(model.inputs[0]),
                *(layer for layer in layers if not isinstance(layer, _Bypass)),
            ],
            name=model.name,
            trainable=model.trainable,
        )
        if model.compiled:  # as clone_model does for Functional models
            new.compile_from_config(model.get_compile_config())
        return new

    def _load_weights(self, old, new):
        folded = self.plan.weights.get(id(old))
        if folded is None:
            new.set_weights(old.get_weights())
            return
        for variable in new.weights:
            variable.assign(folded[variable.name])
