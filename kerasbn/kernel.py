"""Pure tensor functions of batch normalization: moments, the transform and its backward pass.

Shapes. `x` has any rank. `reduction_axes` are the axes statistics are taken over (every axis
but the normalized ones). Per-channel tensors (gamma, beta, mean, variance, count) have x's rank
with size 1 on each reduction axis ("keepdims" shape), so they broadcast against x as they are.
Statistics are float32 for float16/bfloat16/float32 inputs (float16 would overflow Σx²) and
float64 for float64 inputs, so a float64 model keeps float64 precision (`statistics_dtype`).

Forward, the paper's Algorithm 1, with m values per channel (m = N·H·W for conv outputs):

    μ = Σx/m,   σ² = Σ(x−μ)²/m  (biased),   y = γ·(x−μ)/√(σ²+ε) + β

Moments in one pass, shifted. The textbook E[x²]−E[x]² loses every digit when |μ| ≫ σ (for
μ = 1e4, σ = 0.1 in float32 it returns noise). With a per-channel reference value k taken from
the data (the channel's first sample), S1 = Σ(x−k) and S2 = Σ(x−k)² give μ = k + S1/m and
σ² = S2/m − (S1/m)², where the cancellation is only of size (μ−k)²/σ², a few units. Both sums
take one read of x (on XLA:CPU only when summed in blocks, see `_per_channel_sums`). Nor is μ
itself formed on the way to y: rounded to float32, μ = 1e4 is off by up to 5e-4, which is 5e-3
in x̂ when σ = 0.1. The kernel uses
x − μ = (x − k) − δ with δ = S1/m, where x − k is exact (k is within a factor 2 of x).

Backward, the paper's chain rule in closed form, with g = ∂ℓ/∂y and x̂ = (x−μ)/√(σ²+ε):

    ∂ℓ/∂β = Σg,   ∂ℓ/∂γ = Σg·x̂,   ∂ℓ/∂x = γ/√(σ²+ε) · (g − (∂ℓ/∂β + x̂·∂ℓ/∂γ)/m)

two per-channel reductions (one fused read of g and x) and one elementwise pass; x̂ is
recomputed from x rather than stored, which saves a tensor of memory and its traffic.

Masks. With weights w ∈ {0, 1} (1 = counted) broadcastable to x, m = Σw and the moment sums
become Σw·(…). Every position is still normalized, so ∂ℓ/∂β and ∂ℓ/∂γ still sum over every
position, and the correction term of ∂ℓ/∂x is multiplied by w (derivation: ∂μ/∂x_i = w_i/m and
∂σ²/∂x_i = 2·w_i·(x_i−μ)/m).

The stages (`shifted_sums` → `centered_moments`; `gradient_sums` → `input_gradient`) are
separate functions so that a synchronized layer can all-reduce the sums between them.

Batch Renormalization (Ioffe, 2017; `Renorm`, `renorm_correction`): y = γ·(r·x̂ + d) + β with
r, d per channel from the batch moments and the renorm statistics, constants of the step. The
backward is the plain one with γ·r in place of γ, and ∂ℓ/∂γ = r·Σg·x̂ + d·Σg.

Fused activation (`activation`, see `kerasbn.activation`): y = f(z) for the BN output z, in the
same pass; the backward applies g = dy·f′(z) first, z recomputed from x, then BN's closed form.

Ghost batches (`ghost_batch_norm`): a free reshape (N, ...) → (N/k, k, ...) makes the group a
leading non-reduced axis, so the same two XLA functions normalize every group with its own
moments; γ and β are shared, so their gradients are the per-group sums added up (`_sum_to`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import tensorflow as tf

from kerasbn.activation import FUSED

STATISTICS_DTYPE = tf.float32

# Per-channel sums of a large tensor are taken block by block (see `_per_channel_sums`): blocks of
# about _BLOCK_BYTES per float32 operand, for tensors of at least _BLOCKWISE_MIN_BYTES as float32.
# A block stays in a core's L2 (1–2 MiB on current x86). Measured on a 2-core x86 VM
# (benchmarks/bn_step.py): the loop pays from 512 KiB up (2× at 25 MiB) and costs a little below.
# Within a block, groups of _GROUP_ROWS consecutive rows are summed into one accumulator row each
# (benchmarks/sums_bench.py: 16–64 KiB blocks and groups of 4–16 rows within 15 % of each other,
# 128 KiB blocks and larger slower).
_BLOCK_BYTES = 1 << 16
_BLOCKWISE_MIN_BYTES = 1 << 19
_GROUP_ROWS = 8


def statistics_dtype(dtype):
    """The dtype statistics are taken in for inputs of `dtype`: float64 stays float64, every
    other float dtype (float16, bfloat16, float32) gets float32."""
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else STATISTICS_DTYPE


def _as_statistics_dtype(x):
    return tf.cast(x, statistics_dtype(x.dtype))


def _leading_run(reduction_axes):
    """How many leading axes (0, 1, …) are all reduction axes."""
    run = 0
    while run in reduction_axes:
        run += 1
    return run


def _device_type(device):
    """"CPU", "GPU", ... of a TensorFlow device string ("/job:w/replica:0/task:0/device:GPU:0",
    "/GPU:0", "cpu:0", "CPU"), or None when it names no device (TensorFlow then places)."""
    for part in reversed(device.split("/")):
        kind = part.removeprefix("device:").split(":")[0].upper()
        if kind and kind not in ("JOB", "REPLICA", "TASK"):
            return kind
    return None


def sums_strategy(device):
    """How the kernel takes per-channel sums when placed on `device` (a device string, "" for
    TensorFlow's default placement, which is a GPU when one is visible): "blockwise", the
    `_per_channel_sums` loop that works around XLA:CPU's materialized reduction operands, on a
    CPU; "plain" reductions anywhere else, where XLA emits fused reductions itself."""
    kind = _device_type(device or "")
    if kind is None:
        kind = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    return "blockwise" if kind == "CPU" else "plain"


def _per_channel_sums(terms, full, per_channel, reduction_axes, blockwise=True):
    """[Σ t over `reduction_axes` (keepdims) for t in terms(*full, *per_channel)], in a loop.

    `full` are tensors of x's shape, `per_channel` keepdims-shaped tensors or Python numbers,
    and `terms` an elementwise function of them. Why a loop: XLA:CPU (TensorFlow 2.21) gives
    large reductions to a library kernel that reads a materialized operand, so Σ(x−k)² first
    writes (x−k)² to memory as a whole tensor and then reads it back, and each extra term
    does the same. Summing blocks of rows along the leading reduction axes in an XLA while loop
    keeps those temporaries in cache, so the data is read from memory once, as the formulas
    intend.

    Each block is summed in groups of _GROUP_ROWS rows into a loop-carried accumulator of one
    row per group, and the accumulator rows are added up once after the loop. Why not sum the
    whole block: XLA:CPU rewrites a reduction over a block's rows (256 of 64 channels) into a
    reduce-window over 32-row windows that is not fused with the terms (they are written out
    first) and adds each 32-row column in a single dependent chain of vector adds. A reduction
    over a few rows is fused with its terms and emitted as vector adds across the channels (one
    chain per accumulator vector), so the loop reads x at about the speed of an elementwise pass
    (benchmarks/RESULTS.md, 2026-11-26).

    Only on a CPU (`blockwise`, from `sums_strategy`). Small tensors, inputs whose first
    axis is not reduced and dimensions after the leading run that are unknown at trace time
    take the plain path. Meant to run under XLA
    (every caller in kerasbn is compiled); eagerly the loop is a Python loop.

    The sums are statistics, never differentiated (kerasbn's backward pass is the closed form,
    as custom gradients), so both paths cut their inputs from the tape alike. Inside the loop
    each block's sums are cut too: a tape that records a function holding a while loop (eager
    `tf.custom_gradient` records its inner ops) has TensorFlow rewrite the loop to save every
    iteration's intermediates for a backward pass, in lists XLA cannot compile, unless nothing
    in the loop body is differentiable.
    """
    full = [tf.stop_gradient(t) for t in full]
    per_channel = [tf.stop_gradient(p) if tf.is_tensor(p) else p for p in per_channel]
    shape = full[0].shape
    lead = _leading_run(reduction_axes)
    row_shape = shape[lead:]
    small = shape.is_fully_defined() and shape.num_elements() * 4 < _BLOCKWISE_MIN_BYTES
    if not blockwise or lead == 0 or small or not row_shape.is_fully_defined():
        return [tf.reduce_sum(t, reduction_axes, keepdims=True) for t in terms(*full, *per_channel)]

    # Collapse the leading reduction axes into one axis of rows (a free reshape); per-channel
    # tensors have size 1 there. A block of rows is viewed as (groups, group rows, *row_shape)
    # (another free reshape); its reduction axes are the group's rows and any later ones.
    rows = (
        shape[:lead].num_elements() if shape[:lead].is_fully_defined()
        else tf.reduce_prod(tf.shape(full[0])[:lead])
    )
    flat = [tf.reshape(t, [-1, *row_shape]) for t in full]
    block_rows = max(1, _BLOCK_BYTES // (4 * max(1, row_shape.num_elements())))
    group_rows = min(_GROUP_ROWS, block_rows)
    block_rows -= block_rows % group_rows
    later_axes = tuple(a - lead for a in reduction_axes if a >= lead)

    def sums_over(rows_axes, blocks, params):
        axes = (*rows_axes, *(a + max(rows_axes) + 1 for a in later_axes))
        return [tf.reduce_sum(t, axes, keepdims=True) for t in terms(*blocks, *params)]

    def with_leading_ones(count):
        return [
            tf.reshape(p, [1] * count + p.shape[lead:].as_list()) if tf.is_tensor(p) else p
            for p in per_channel
        ]

    grouped_params = with_leading_ones(2)

    # Never more rows than there are: with fewer, the loop runs zero times, but XLA still
    # compiles its body, and a slice larger than its operand does not compile. (Fewer rows than
    # a block happens only when the batch size is known at run time alone.)
    whole_groups = rows - rows % group_rows
    slice_rows = (
        min(block_rows, whole_groups) if isinstance(rows, int)
        else tf.minimum(block_rows, whole_groups)
    )
    groups = slice_rows // group_rows

    def body(i, *totals):
        start = [i * block_rows] + [0] * len(row_shape)
        blocks = [
            tf.reshape(
                tf.slice(t, start, [slice_rows, *row_shape]), [groups, group_rows, *row_shape]
            )
            for t in flat
        ]
        sums = [tf.stop_gradient(s) for s in sums_over((1,), blocks, grouped_params)]
        return (i + 1, *(total + s for total, s in zip(totals, sums, strict=True)))

    whole_blocks = rows // block_rows
    tail = sums_over((0,), [t[whole_blocks * block_rows:] for t in flat], with_leading_ones(1))
    _, *totals = tf.while_loop(
        lambda i, *_: i < whole_blocks, body,
        (tf.constant(0), *(tf.zeros([groups, *s.shape], s.dtype) for s in tail)),
    )
    # The group rows of each accumulator, added up once (after the loop, so XLA cannot merge
    # this reduction with the loop's into one over the whole block).
    keepdims = [1 if a in reduction_axes else d for a, d in enumerate(shape)]
    return [
        tf.reshape(tf.reduce_sum(total, [0, 1]) + t, keepdims)
        for total, t in zip(totals, tail, strict=True)
    ]


def per_channel(weight, default, keepdims_shape, dtype=STATISTICS_DTYPE):
    """A (channel-shaped) parameter in keepdims shape and `dtype`; `default` where it is None
    (a BN without gamma or beta)."""
    if weight is None:
        return tf.fill(keepdims_shape, tf.constant(default, dtype))
    return tf.reshape(tf.cast(weight, dtype), keepdims_shape)


def mask_weights(inputs, mask):
    """A Keras mask → float weights broadcastable to inputs (None stays None).

    Keras masks carry no feature axis (e.g. (batch, time) for (batch, time, features)), so a
    mask of one rank less gets a trailing axis; one of the inputs' rank is used as it is.
    """
    if mask is None:
        return None
    rank = len(inputs.shape)
    if len(mask.shape) == rank - 1:
        mask = tf.expand_dims(mask, -1)
    elif len(mask.shape) != rank:
        raise ValueError(
            "The mask must have the inputs' rank or one less. Received: "
            f"mask.shape={tuple(mask.shape)}, inputs.shape={tuple(inputs.shape)}"
        )
    return tf.cast(mask, statistics_dtype(inputs.dtype))


def reference_value(x, reduction_axes, weights=None):
    """A per-channel value close to the channel's data, used to shift the moment sums.

    Without a mask it is the channel's first sample. With a mask the first position may be
    padding far from the data, so it is the masked mean (one extra pass, masks only).
    """
    if weights is None:
        first = tuple(
            slice(0, 1) if a in reduction_axes else slice(None) for a in range(x.shape.rank)
        )
        return tf.stop_gradient(x[first])
    weights = tf.broadcast_to(weights, tf.shape(x))
    count = tf.reduce_sum(weights, reduction_axes, keepdims=True)
    total = tf.reduce_sum(weights * x, reduction_axes, keepdims=True)
    return tf.stop_gradient(tf.math.divide_no_nan(total, count))


def value_count(x, reduction_axes, weights=None):
    """m per channel: the number of (unmasked) values each statistic is taken over."""
    if weights is None:
        shape = tf.shape(x)
        m = tf.reduce_prod(tf.gather(shape, list(reduction_axes)))
        keepdims_shape = [1 if a in reduction_axes else shape[a] for a in range(x.shape.rank)]
        return tf.fill(keepdims_shape, tf.cast(m, x.dtype))
    weights = tf.broadcast_to(weights, tf.shape(x))
    return tf.reduce_sum(weights, reduction_axes, keepdims=True)


def shifted_sums(x, shift, reduction_axes, weights=None, *, blockwise=True):
    """Per-channel (S1, S2) = (Σw·(x−k), Σw·(x−k)²): the sums that add up across replicas."""
    if weights is not None:
        d = x - shift
        wd = weights * d
        return (
            tf.reduce_sum(wd, reduction_axes, keepdims=True),
            tf.reduce_sum(wd * d, reduction_axes, keepdims=True),
        )

    def terms(x, shift):
        d = x - shift
        return d, d * d

    return tuple(_per_channel_sums(terms, [x], [shift], reduction_axes, blockwise))


def centered_moments(count, sum_shifted, sum_sq_shifted):
    """(δ, σ²): the mean relative to the shift, δ = μ − k, and the biased variance.

    A channel with count 0 (every position masked) gets δ = 0 and σ² = 0, as Keras's layer
    does: the batch is then normalized as (x − k)/√ε with finite outputs and gradients, and
    its statistics are rejected by the update rules (m < 1).
    """
    shifted_mean = tf.math.divide_no_nan(sum_shifted, count)
    # Rounding can leave a tiny negative difference for a constant channel; a variance is >= 0.
    variance = tf.maximum(
        tf.math.divide_no_nan(sum_sq_shifted, count) - tf.square(shifted_mean), 0.0
    )
    return shifted_mean, variance


def inverse_std(variance, epsilon):
    return tf.math.rsqrt(variance + epsilon)


def inference_affine(gamma, beta, mean, variance, epsilon):
    """(scale, offset) such that inference BN is y = x·scale + offset (the map export folds)."""
    scale = gamma * inverse_std(variance, epsilon)
    return scale, beta - mean * scale


def normalized(x, mean, inv_std, shift=0.0):
    """x̂ = ((x − shift) − mean)·inv_std in float32, where `mean` is relative to `shift`.

    Passing the reference value as `shift` and δ as `mean` keeps the digits a rounded μ loses.
    """
    return ((_as_statistics_dtype(x) - shift) - mean) * inv_std


def _bn_output_gradient(dy, x_hat, activation, scale, offset):
    """g = ∂ℓ/∂z for the BN output z = x̂·scale + offset: dy itself, or with a fused
    activation a = f(z), dy·f′(z) (`kerasbn.activation`), z recomputed from x̂."""
    g = _as_statistics_dtype(dy)
    if activation is None:
        return g
    return g * FUSED[activation].derivative(x_hat * scale + offset)


def gradient_sums(
    dy, x, mean, inv_std, reduction_axes, *, shift=0.0, activation=None, scale=1.0, offset=0.0,
    blockwise=True,
):
    """Per-channel (Σg, Σg·x̂) = (∂ℓ/∂β, ∂ℓ/∂γ): the sums the backward pass needs.

    `mean` is relative to `shift` (see `normalized`). With a fused `activation`, dy is the
    gradient of its output and g = dy·f′(x̂·scale + offset).
    """

    def terms(dy, x, mean, inv_std, shift, scale, offset):
        x_hat = normalized(x, mean, inv_std, shift)
        g = _bn_output_gradient(dy, x_hat, activation, scale, offset)
        return g, g * x_hat

    return tuple(
        _per_channel_sums(
            terms, [dy, x], [mean, inv_std, shift, scale, offset], reduction_axes, blockwise
        )
    )


def input_gradient(
    dy, x, gamma, mean, inv_std, count, sum_g, sum_g_xhat, weights=None, *, shift=0.0,
    activation=None, offset=0.0,
):
    """∂ℓ/∂x = γ/√(σ²+ε) · (g − w·(Σg + x̂·Σg·x̂)/m), in x's dtype.

    `mean` is relative to `shift` (see `normalized`). With a fused `activation`, g is dy·f′(z)
    for the BN output z = x̂·γ + offset.
    """
    x_hat = normalized(x, mean, inv_std, shift)
    g = _bn_output_gradient(dy, x_hat, activation, gamma, offset)
    # divide_no_nan: a fully masked channel (m = 0) has no correction term (its weights are 0).
    correction = tf.math.divide_no_nan(sum_g + x_hat * sum_g_xhat, count)
    if weights is not None:
        correction = _as_statistics_dtype(weights) * correction
    return tf.cast(gamma * inv_std * (g - correction), x.dtype)


class Renorm(NamedTuple):
    """Batch Renormalization's inputs to the training kernel (Ioffe, 2017).

    `mean` and `stddev`: the renorm moving statistics μ and σ, keepdims shape, in the
    statistics dtype. `rmin`, `rmax`, `dmax`: scalar clipping bounds (0, inf, inf when the user
    gave none), tensors or numbers, so that a warm-up schedule can change them every step.
    """

    mean: tf.Tensor
    stddev: tf.Tensor
    rmin: tf.Tensor | float
    rmax: tf.Tensor | float
    dmax: tf.Tensor | float


def renorm_correction(mean, variance, epsilon, renorm):
    """(r, d) of Batch Renormalization, with Keras 3.14+'s formulas:

        σ_B = √(σ²_B + ε),   σ = max(renorm_stddev, √ε)
        r = clip(σ_B/σ, rmin, rmax),   d = clip((μ_B − μ)/σ, −dmax, dmax)

    Constants of the step: no gradient flows through them (the paper's stop_gradient).
    """
    stddev = tf.sqrt(variance + epsilon)
    moving_stddev = tf.maximum(renorm.stddev, tf.sqrt(tf.cast(epsilon, variance.dtype)))
    rmin, rmax, dmax = (tf.cast(b, variance.dtype) for b in (renorm.rmin, renorm.rmax, renorm.dmax))
    r = tf.minimum(tf.maximum(stddev / moving_stddev, rmin), rmax)
    d = tf.clip_by_value((mean - renorm.mean) / moving_stddev, -dmax, dmax)
    return tf.stop_gradient(r), tf.stop_gradient(d)


def _training_forward(
    x, gamma, beta, weights, renorm, rule, state, *, reduction_axes, epsilon, activation, pooled,
    blockwise,
):
    x32 = _as_statistics_dtype(x)
    if weights is not None:
        weights = _as_statistics_dtype(weights)
    shift = reference_value(x32, reduction_axes, weights)
    count = value_count(x32, reduction_axes, weights)
    shifted_mean, variance = centered_moments(
        count, *shifted_sums(x32, shift, reduction_axes, weights, blockwise=blockwise)
    )
    inv_std = inverse_std(variance, epsilon)
    x_hat = normalized(x32, shifted_mean, inv_std, shift)
    if renorm is None:
        r = d = None
        # x̂·γ + β rather than x·s + t: when |μ| ≫ σ, x·s and t are huge and cancel.
        y = x_hat * gamma + beta
    else:
        r, d = renorm_correction(shift + shifted_mean, variance, epsilon, renorm)
        y = x_hat * (gamma * r) + (gamma * d + beta)
    if activation is not None:
        y = FUSED[activation].forward(y)
    saved = (shift, shifted_mean, variance, count, r, d)
    moments = (shift + shifted_mean, variance, count)
    if pooled:
        moments = pooled_moments(*moments)
    if rule is None:
        return tf.cast(y, x.dtype), saved, moments
    # The statistics update, here so that it runs in this XLA cluster (see `fused_batch_norm`).
    return tf.cast(y, x.dtype), saved, rule(state, *moments)


def _training_backward(
    dy, x, gamma, beta, shift, shifted_mean, variance, count, weights, r, d, *,
    reduction_axes, epsilon, activation, blockwise,
):
    inv_std = inverse_std(variance, epsilon)
    # The BN output is z = x̂·scale + offset: with renorm y = γ·(r·x̂ + d) + β, where r and d
    # are constants, so the plain backward holds with γ·r for γ.
    scale, offset = (gamma, beta) if r is None else (gamma * r, gamma * d + beta)
    sum_g, sum_g_xhat = gradient_sums(
        dy, x, shifted_mean, inv_std, reduction_axes, shift=shift, activation=activation,
        scale=scale, offset=offset, blockwise=blockwise,
    )
    dx = input_gradient(
        dy, x, scale, shifted_mean, inv_std, count, sum_g, sum_g_xhat, weights, shift=shift,
        activation=activation, offset=offset,
    )
    # ∂ℓ/∂γ = Σg·x̂, with renorm r·Σg·x̂ + d·Σg.
    d_gamma = sum_g_xhat if r is None else r * sum_g_xhat + d * sum_g
    return dx, _sum_to(d_gamma, gamma.shape), _sum_to(sum_g, gamma.shape)


def _sum_to(t, shape):
    """Σ over the axes where `shape` has size 1 and t not: ghost batches share γ and β across
    the group axis, whose per-group sums add up."""
    axes = [a for a, (n, size) in enumerate(zip(t.shape, shape, strict=True)) if size == 1 != n]
    return tf.reduce_sum(t, axes, keepdims=True) if axes else t


class _CompiledPerTrace:
    """`function` as one XLA cluster, whether or not the caller's model is compiled with XLA (a
    nested jit function is inlined into an enclosing XLA cluster): a `tf.function` per trace
    key, so that each traces once.

    A trace key is what makes TensorFlow trace anew: the static keyword arguments, the shapes
    and dtypes of the tensors, and the other arguments' values. A single `tf.function` would
    trace once per BN input shape too, but called eagerly (a model run eagerly, a population
    pass by hand) it counts those traces and warns after five ("5 out of the last 5 calls to
    <function _training_forward> triggered tf.function retracing"), which every model with five
    BN shapes would print. TensorFlow counts per Python function (its code object), so each
    key's function is a `functools.partial` of its own. No reduce_retracing: it relaxes shapes
    of different ranks to an unknown rank, and XLA compiles per concrete shape anyway.
    """

    def __init__(self, function):
        self._function = function
        self._compiled = {}

    def __call__(self, *args, **static):
        key = (_trace_key(args), tuple(sorted(static.items())))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = tf.function(functools.partial(self._function, **static), jit_compile=True)
            self._compiled[key] = compiled
        return compiled(*args)


def _trace_key(args):
    """A hashable key of the positional arguments: per argument, its structure (a dict's keys,
    else its type: None, a tensor, a `Renorm`), and for each leaf the (shape, dtype) of a
    tensor or the value of anything else (numbers, update rules)."""
    return tuple(
        (
            tuple(sorted(arg)) if isinstance(arg, dict) else type(arg),
            tuple(
                tf.TensorSpec(leaf.shape, leaf.dtype) if tf.is_tensor(leaf) else leaf
                for leaf in tf.nest.flatten(arg)
            ),
        )
        for arg in args
    )


_compiled_forward = _CompiledPerTrace(_training_forward)
_compiled_backward = _CompiledPerTrace(_training_backward)


def fused_batch_norm(
    x, gamma, beta, *, reduction_axes, epsilon, weights=None, renorm=None, activation=None,
    update=None,
):
    """Training-mode batch normalization with the closed-form backward pass.

    Args:
        x: input of any float dtype and rank.
        gamma, beta: keepdims shape (size 1 on every reduction axis), in the statistics dtype
            of x (`statistics_dtype`).
        reduction_axes: tuple of the axes statistics are taken over.
        epsilon: float added to the variance.
        weights: optional mask weights broadcastable to x (1 = counted).
        renorm: optional `Renorm`: y = γ·(r·x̂ + d) + β (`renorm_correction`), r and d
            constants in the backward pass.
        activation: None, or a key of `kerasbn.activation.FUSED`: y = f(BN(x)), its
            derivative applied to dy before BN's backward.
        update: optional `StatisticsUpdate` (an `updates.UpdateRule` and the current values of
            the stored statistics): the new values are computed from the batch moments in the
            same compiled call as y, so that a layer has only its variable writes left to do.

    Returns:
        Without `update`, (y, mean, variance, count): y in x's dtype; the batch moments (biased
        variance) and the per-channel count m, in the statistics dtype and keepdims shape.
        With `update`, (y, new_state, accepted): the rule's result (`UpdateRule.__call__`).
        Gradients flow to x, gamma and beta through y only; the statistics are not part of the
        differentiable output.
    """
    y, statistics = _fused(
        x, gamma, beta, reduction_axes=reduction_axes, epsilon=epsilon, weights=weights,
        renorm=renorm, activation=activation, update=update, pooled=False,
    )
    return (y, *statistics)


def batch_norm_forward(
    x, gamma, beta, *, reduction_axes, epsilon, weights=None, activation=None
):
    """Training-mode batch normalization, forward only: (y, mean, variance, count).

    The forward of `fused_batch_norm` itself (the same function: the same shifted one-pass
    moments, the same y), for passes that take no gradient, such as Algorithm 2's population
    pass (`kerasbn.population_statistics`): no `tf.custom_gradient` wraps it and nothing is
    kept for a backward pass. Arguments as for `fused_batch_norm`; the moments are the batch
    mean, biased variance and per-channel count m in the statistics dtype and keepdims shape.

    A tensor known at trace time to be smaller than _BLOCKWISE_MIN_BYTES as float32 runs the
    function as plain TensorFlow operations in the caller's graph rather than as an XLA
    cluster of its own: launching the cluster costs more than it saves there (a (64, 512)
    batch: 0.33 ms plain against 0.46 ms compiled, 2-core machine under load), and its sums
    would not be blockwise anyway. Larger ones, or of a size known only at run time, are
    compiled as in training.
    """
    _check_activation(activation)
    small = x.shape.is_fully_defined() and x.shape.num_elements() * 4 < _BLOCKWISE_MIN_BYTES
    forward = _training_forward if small else _compiled_forward
    y, _, moments = forward(
        x, gamma, beta, weights, None, None, None, reduction_axes=tuple(reduction_axes),
        epsilon=float(epsilon), activation=activation, pooled=False,
        blockwise=not small and sums_strategy(x.device) == "blockwise",
    )
    return (y, *moments)


def _check_activation(activation):
    if activation is not None and activation not in FUSED:
        raise ValueError(
            f"`activation` must be None or one of {tuple(FUSED)}. Received: "
            f"activation={activation!r}"
        )


class StatisticsUpdate(NamedTuple):
    """`rule`: a hashable `updates.UpdateRule` (a static argument of the compiled forward);
    `state`: {variable name: current value} of the statistics it updates."""

    rule: object
    state: dict


def _fused(
    x, gamma, beta, *, reduction_axes, epsilon, weights, renorm, activation, update, pooled
):
    """(y, statistics): the moments (mean, variance, count), pooled over the groups of axis 0
    when `pooled`; or with `update`, (new_state, accepted)."""
    reduction_axes = tuple(reduction_axes)
    epsilon = float(epsilon)
    _check_activation(activation)
    if renorm is not None:
        renorm = Renorm(*(tf.stop_gradient(t) if tf.is_tensor(t) else t for t in renorm))
    rule, state = (None, None) if update is None else (
        update.rule, {k: tf.stop_gradient(v) for k, v in update.state.items()}
    )
    # A static choice per trace: where the caller places the kernel.
    blockwise = sums_strategy(x.device) == "blockwise"
    structure = []

    @tf.custom_gradient
    def _batch_norm(x, gamma, beta):
        y, saved, statistics = _compiled_forward(
            x, gamma, beta, weights, renorm, rule, state, reduction_axes=reduction_axes,
            epsilon=epsilon, activation=activation, pooled=pooled, blockwise=blockwise,
        )
        shift, shifted_mean, variance, count, r, d = saved
        structure.append(statistics)

        def grad(dy, *_unused_statistics_grads):
            return _compiled_backward(
                dy, x, gamma, beta, shift, shifted_mean, variance, count, weights, r, d,
                reduction_axes=reduction_axes, epsilon=epsilon, activation=activation,
                blockwise=blockwise,
            )

        # Flat: custom_gradient hands its grad function one gradient per output tensor.
        return (y, *tf.nest.flatten(statistics)), grad

    y, *flat = _batch_norm(x, gamma, beta)
    return y, tf.nest.pack_sequence_as(structure[-1], [tf.stop_gradient(t) for t in flat])


# --- ghost (virtual) batches -----------------------------------------------------------------


def _grouped(t, virtual_batch_size):
    """(N, ...) → (N/k, k, ...); a keepdims-shaped tensor (1, ...) → (1, 1, ...)."""
    if t.shape[0] == 1:
        return tf.expand_dims(t, 0)
    return tf.reshape(t, tf.concat([[-1, virtual_batch_size], tf.shape(t)[1:]], 0))


def pooled_moments(mean, variance, count):
    """Per-group moments (axis 0 is the group) → the batch's (mean, variance, count, dof).

        mean     = Σ_g m_g·μ_g / Σ_g m_g          (the batch mean)
        variance = Σ_g m_g·σ²_g / Σ_g m_g        (biased: the mean within-group variance)
        count    = Σ_g m_g,   dof = Σ_g max(m_g − 1, 0)

    so that the unbiased update variance·count/dof is the pooled within-group estimate
    Σ_g m_g·σ²_g / Σ_g (m_g − 1): the population variance, unbiased for i.i.d. samples.
    """
    total = tf.reduce_sum(count, 0)
    pooled_mean = tf.math.divide_no_nan(tf.reduce_sum(count * mean, 0), total)
    pooled_variance = tf.math.divide_no_nan(tf.reduce_sum(count * variance, 0), total)
    dof = tf.reduce_sum(tf.maximum(count - 1.0, 0.0), 0)
    return pooled_mean, pooled_variance, total, dof


def ghost_batch_norm(
    x, gamma, beta, *, virtual_batch_size, reduction_axes, epsilon, weights=None, renorm=None,
    activation=None, update=None,
):
    """`fused_batch_norm` with each group of `virtual_batch_size` consecutive examples (axis 0)
    normalized with its own moments (ghost batch normalization, Hoffer et al., 2017).

    The groups become a leading non-reduced axis of a free reshape, so the same fused kernel
    and closed-form backward run once for all groups. Axis 0 must be a reduction axis and the
    batch size a multiple of `virtual_batch_size` (the caller checks).

    Returns:
        Without `update`, (y, mean, variance, count, dof): y in x's shape and dtype; the
        statistics of the whole batch pooled from the groups' (`pooled_moments`), in x's
        keepdims shape. With `update`, (y, new_state, accepted), the rule applied to those
        pooled statistics inside the compiled forward.
    """
    k = int(virtual_batch_size)
    grouped_axes = (1, *(a + 1 for a in reduction_axes if a != 0))
    y, statistics = _fused(
        _grouped(x, k), _grouped(gamma, k), _grouped(beta, k),
        reduction_axes=grouped_axes, epsilon=epsilon, activation=activation,
        weights=None if weights is None else _grouped(tf.broadcast_to(weights, tf.shape(x)), k),
        renorm=None if renorm is None else renorm._replace(
            mean=_grouped(renorm.mean, k), stddev=_grouped(renorm.stddev, k)
        ),
        update=update, pooled=True,
    )
    # Pooled, the groups' moments (G, 1, ...) have x's keepdims shape (1, ...).
    return (tf.reshape(y, tf.shape(x)), *statistics)
