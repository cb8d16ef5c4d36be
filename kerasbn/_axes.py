"""The one place where a BN `axis` argument is turned into axes of a concrete input."""

from __future__ import annotations

from collections.abc import Sequence


def canonical_axis(axis) -> int | tuple[int, ...]:
    """Validate the *type* of a user's `axis` (an int or a sequence of ints) without a rank.

    Returns an int, or a tuple of ints, as given (negative axes are kept: the rank is not known
    until `build`). Raises `TypeError`/`ValueError` naming the value received.
    """
    if isinstance(axis, bool):
        raise TypeError(f"`axis` must be an int or a tuple of ints. Received: axis={axis!r}")
    if isinstance(axis, int):
        return axis
    if isinstance(axis, Sequence) and not isinstance(axis, str):
        if len(axis) == 0:
            raise ValueError(f"`axis` must name at least one axis. Received: axis={axis!r}")
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in axis):
            raise TypeError(f"`axis` must be an int or a tuple of ints. Received: axis={axis!r}")
        return tuple(axis)
    raise TypeError(f"`axis` must be an int or a tuple of ints. Received: axis={axis!r}")


def normalize_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Return `axis` as a sorted tuple of non-negative axes of a rank-`ndim` input.

    Raises `ValueError` for an axis out of range or named twice (after wrapping negatives, so
    `(1, -3)` on a rank-4 input is a duplicate).
    """
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    wrapped = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"`axis` is out of range for an input of rank {ndim}. Received: axis={axis!r}"
            )
        wrapped.append(a % ndim)
    if len(set(wrapped)) != len(wrapped):
        raise ValueError(f"`axis` names the same axis twice. Received: axis={axis!r}")
    return tuple(sorted(wrapped))


def reduction_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """The axes statistics are taken over: every axis not in `axes`."""
    return tuple(a for a in range(ndim) if a not in axes)
