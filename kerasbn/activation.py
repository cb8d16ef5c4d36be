"""Activations the training kernel applies inside its own pass, with their derivatives.

BN followed by an activation is the paper's placement (BN(Wu) then g(·)). Fused, the output is
a = f(z) with z = γ·x̂ + β (or γ·(r·x̂ + d) + β with renorm), computed in the same XLA pass as z.
The backward pass needs ∂ℓ/∂z = ∂ℓ/∂a · f′(z), an elementwise factor applied to the incoming
gradient before BN's own closed-form backward; z is recomputed from x there, as x̂ is, so
nothing more is stored than for plain BN.

Each pair is Keras's function (TensorFlow backend) and TensorFlow's gradient of it, kinks
included, so a fused layer trains exactly as BN followed by `keras.layers.Activation`:

    relu        max(z, 0)                 f′ = [z > 0]
    relu6       min(max(z, 0), 6)         f′ = [0 < z < 6]
    sigmoid     s = 1/(1 + e^−z)          f′ = s·(1 − s)
    silu/swish  z·s                       f′ = s·(1 + z·(1 − s))
    hard_silu   z·relu6(z + 3)/6          f′ = relu6(z + 3)/6 + z·[−3 < z < 3]/6
    /hard_swish

Any other Keras activation is not fused: the layer applies it after the kernel (`fused_name`
returns None for it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import keras
import tensorflow as tf


class Fused(NamedTuple):
    forward: Callable
    derivative: Callable  # f′(z), given z


def _relu_derivative(z):
    return tf.cast(z > 0, z.dtype)


def _relu6_derivative(z):
    return tf.cast((z > 0) & (z < 6), z.dtype)


def _sigmoid_derivative(z):
    s = tf.sigmoid(z)
    return s * (1 - s)


def _silu_derivative(z):
    s = tf.sigmoid(z)
    return s * (1 + z * (1 - s))


def _hard_silu(z):
    return z * (tf.nn.relu6(z + 3) / 6)


def _hard_silu_derivative(z):
    return tf.nn.relu6(z + 3) / 6 + z * tf.cast((z > -3) & (z < 3), z.dtype) / 6


FUSED = {
    "relu": Fused(tf.nn.relu, _relu_derivative),
    "relu6": Fused(tf.nn.relu6, _relu6_derivative),
    "sigmoid": Fused(tf.sigmoid, _sigmoid_derivative),
    "silu": Fused(tf.nn.silu, _silu_derivative),
    "hard_silu": Fused(_hard_silu, _hard_silu_derivative),
}


def get(activation):
    """The Keras activation function for `activation` (None is linear), or a ValueError naming
    the argument."""
    try:
        return keras.activations.get(activation)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"`activation` must be None, the name of a Keras activation or a callable. "
            f"Received: activation={activation!r}"
        ) from error


def fused_name(function):
    """The key in `FUSED` of a Keras activation function ("swish" is "silu", "hard_swish" is
    "hard_silu"), or None for linear and for any activation the kernel does not fuse."""
    for name in FUSED:
        if function is keras.activations.get(name):
            return name
    return None


def is_linear(function):
    return function is keras.activations.linear
