"""Which layers a BN folds into, and where each keeps its channels: one table, no branches.

Exact classes only: a subclass may compute something else with the same weights.
"""

from __future__ import annotations

import dataclasses

import keras

from kerasbn import BatchNormalization as KerasbnBatchNormalization

_L = keras.layers
BN_CLASSES = (KerasbnBatchNormalization, _L.BatchNormalization)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a producer keeps its output channels: the variable, and the axes in it."""

    kernel: str
    channel_axis: int | tuple[int, ...]


PRODUCER_LAYOUTS = {
    _L.Dense: Layout("kernel", -1),
    **dict.fromkeys((_L.Conv1D, _L.Conv2D, _L.Conv3D), Layout("kernel", -1)),
    **dict.fromkeys(
        (_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose), Layout("kernel", -2)
    ),
    **dict.fromkeys((_L.DepthwiseConv1D, _L.DepthwiseConv2D), Layout("kernel", (-2, -1))),
    **dict.fromkeys((_L.SeparableConv1D, _L.SeparableConv2D), Layout("pointwise_kernel", -1)),
}
# Their kernels are all (*window, in_per_group, out): the layout `fold_forward` takes.
CONSUMER_CLASSES = (_L.Dense, _L.Conv1D, _L.Conv2D, _L.Conv3D)


def channel_axis(layer, rank):
    """The axis of `layer`'s output (or input) of rank `rank` that holds its channels."""
    return 1 if getattr(layer, "data_format", None) == "channels_first" else rank - 1
