"""Time formulations of the per-channel sums on XLA:CPU: the kernel's against the alternatives.

The sums of kerasbn's training step, on x viewed as (M, C) rows of channels (a free reshape):
    forward    one read of x:        Σd, Σd²      with d = x − k
    backward   two reads (dy, x):    Σg, Σg·x̂     with g = dy, x̂ = (x − k)·s
Every formulation below is one `tf.function(jit_compile=True)` per shape and pass, checked
against a float64 NumPy reference, and timed interleaved with the others (medians, CPU time
beside wall; GB/s counts the bytes of the tensors read once).

    kernel            kerasbn.kernel._per_channel_sums as the kernel runs it on a CPU: an XLA
                      while loop over 64 KiB blocks, each summed in groups of 8 rows into a
                      loop-carried accumulator (one row per group)
    whole-block loop  the same loop summing each block in one reduction, as the kernel did
                      before 2026-11-26 (XLA:CPU turns it into an unfused reduce-window)
    grouped loop B,g  the kernel's loop with B rows per block (at C = 64; scaled by 64/C) and
                      groups of g rows
    packed loop       the grouped loop with both sums in one complex64 accumulator (a + i·a·b),
                      one fused reduction instead of two
    plain             tf.reduce_sum of each term over the whole tensor
    grouped, no loop  (M/g, g, C) reduced over g, then over M/g (XLA merges the two reductions)
    wide k            (M/k, k·C) reduced over rows, then the k copies of each channel
    dot               ones(1, M) @ t for each term (the product written out first)
    einsum            Σa·b as einsum("mc,mc->c") (a dot_general with the channel as batch)

    .venv/bin/python benchmarks/sums_bench.py                 # both shapes, all formulations
    .venv/bin/python benchmarks/sums_bench.py --quick --only kernel "whole-block loop"
"""

from __future__ import annotations

import kerasbn_programs

kerasbn_programs.quiet_tensorflow_import()  # before anything imports TensorFlow

import os
import sys

import numpy as np
import tensorflow as tf

from kerasbn import kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # a sibling file, not an installed module

SHAPES = ((32, 56, 56, 64), (64, 32, 32, 16))


# --- the two passes: (inputs, per-channel constants) → the pair (a, b); the sums are Σa, Σa·b --


def forward_pair(x, k, s):
    d = x - k
    return d, d


def backward_pair(dy, x, k, s):
    return dy, (x - k) * s


def terms_of(pair):
    def terms(*args):
        a, b = pair(*args)
        return a, a * b

    return terms


# --- the formulations: (pair, full (M, C) tensors, per-channel (1, C) constants) → [Σa, Σa·b] --


def kernel_sums(pair, full, consts):
    return kernel._per_channel_sums(terms_of(pair), full, consts, (0,), True)


def plain_sums(pair, full, consts):
    return kernel._per_channel_sums(terms_of(pair), full, consts, (0,), False)


def loop_sums(pair, full, consts, *, block_rows, group_rows=None, packed=False):
    """A while loop over blocks of `block_rows` rows (M must be a multiple). `group_rows`
    None: each block summed whole; else in groups into a (groups, C) accumulator; `packed`:
    both sums in one complex accumulator."""
    m, c = full[0].shape
    group_rows = group_rows or block_rows
    groups = block_rows // group_rows
    consts = [tf.reshape(k, [1, 1, c]) for k in consts]

    def block_terms(i):
        blocks = [
            tf.reshape(tf.slice(t, [i * block_rows, 0], [block_rows, c]), [groups, group_rows, c])
            for t in full
        ]
        a, b = pair(*blocks, *consts)
        return (tf.complex(a, a * b),) if packed else (a, a * b)

    def body(i, *totals):
        sums = [tf.reduce_sum(t, 1) for t in block_terms(i)]
        return (i + 1, *(total + s for total, s in zip(totals, sums, strict=True)))

    dtype = tf.complex64 if packed else tf.float32
    start = tuple(tf.zeros([groups, c], dtype) for _ in range(1 if packed else 2))
    _, *totals = tf.while_loop(lambda i, *_: i < m // block_rows, body, (tf.constant(0), *start))
    sums = [tf.reduce_sum(t, 0) for t in totals]
    return [tf.math.real(sums[0]), tf.math.imag(sums[0])] if packed else sums


def grouped_no_loop_sums(pair, full, consts, *, group_rows=32):
    m, c = full[0].shape
    grouped = [tf.reshape(t, [m // group_rows, group_rows, c]) for t in full]
    consts = [tf.reshape(k, [1, 1, c]) for k in consts]
    return [tf.reduce_sum(tf.reduce_sum(t, 1), 0) for t in terms_of(pair)(*grouped, *consts)]


def wide_sums(pair, full, consts, *, copies=8):
    m, c = full[0].shape
    wide = [tf.reshape(t, [m // copies, copies * c]) for t in full]
    consts = [tf.tile(k, [1, copies]) for k in consts]
    return [
        tf.reduce_sum(tf.reshape(tf.reduce_sum(t, 0), [copies, c]), 0)
        for t in terms_of(pair)(*wide, *consts)
    ]


def dot_sums(pair, full, consts):
    ones = tf.ones([1, full[0].shape[0]])
    return [tf.matmul(ones, t)[0] for t in terms_of(pair)(*full, *consts)]


def einsum_sums(pair, full, consts):
    a, b = pair(*full, *consts)
    return [tf.reduce_sum(a, 0), tf.einsum("mc,mc->c", a, b)]


def scaled(function, rows_at_64_channels, **options):
    """A loop formulation with blocks of the same bytes at any channel count."""

    def sums(pair, full, consts):
        block_rows = rows_at_64_channels * 64 // full[0].shape[1]
        return function(pair, full, consts, block_rows=block_rows, **options)

    return sums


FORMULATIONS = {
    "kernel": kernel_sums,
    "whole-block loop": scaled(loop_sums, 256),
    "grouped loop 256,8": scaled(loop_sums, 256, group_rows=8),
    "grouped loop 128,16": scaled(loop_sums, 128, group_rows=16),
    "grouped loop 512,8": scaled(loop_sums, 512, group_rows=8),
    "grouped loop 1024,8": scaled(loop_sums, 1024, group_rows=8),
    "packed loop 128,16": scaled(loop_sums, 128, group_rows=16, packed=True),
    "plain": plain_sums,
    "grouped, no loop": grouped_no_loop_sums,
    "wide 8": wide_sums,
    "dot": dot_sums,
    "einsum": einsum_sums,
}


def reference(pass_name, full, consts):
    """[Σa, Σa·b] in float64 NumPy."""
    full = [t.numpy().astype(np.float64) for t in full]
    k, s = (t.numpy().astype(np.float64) for t in consts)
    if pass_name == "forward":
        a = b = full[0] - k
    else:
        a, b = full[0], (full[1] - k) * s
    return [a.sum(0), (a * b).sum(0)]


def run(shape, pass_name, names, args):
    rng = np.random.default_rng(0)
    m, c = int(np.prod(shape[:-1])), shape[-1]
    x = tf.constant(rng.normal(1.0, 2.0, (m, c)).astype(np.float32))
    dy = tf.constant(rng.normal(0.0, 1.0, (m, c)).astype(np.float32))
    consts = [x[:1], tf.constant(rng.uniform(0.5, 1.0, (1, c)).astype(np.float32))]
    full = [x] if pass_name == "forward" else [dy, x]
    pair = forward_pair if pass_name == "forward" else backward_pair
    expected = reference(pass_name, full, consts)
    calls = {}
    for name in names:
        compiled = tf.function(
            lambda full, consts, f=FORMULATIONS[name]: f(pair, full, consts), jit_compile=True
        )
        got = [np.reshape(t.numpy(), -1) for t in compiled(full, consts)]
        error = max(
            float(np.max(np.abs(g - e)) / np.max(np.abs(e)))
            for g, e in zip(got, expected, strict=True)
        )
        if error > 1e-4:
            raise RuntimeError(f"{name} is off the float64 sums by {error:.1e} (relative)")
        calls[name] = lambda f=compiled: f(full, consts)[0].numpy()
    times = _timing.interleaved_times(calls, repeats=args.repeats, warmup=args.warmup,
                                      min_sample_seconds=args.min_sample)
    nbytes = len(full) * m * c * 4
    first = times[names[0]].median
    print(f"\n  {pass_name}, {shape} as ({m}, {c}): {len(full)} read(s), {nbytes / 1e6:.1f} MB")
    print(f"  {'formulation':<22}{'median':>12}{'IQR':>6}{'CPU':>13}{'GB/s':>7}"
          f"{'÷ ' + names[0]:>20}")
    for name, samples in times.items():
        print(
            f"  {name:<22}{_timing.format_ms(samples.median)}{samples.spread:>6.0%}"
            f"{_timing.format_ms(samples.cpu_median)}{nbytes / samples.median / 1e9:>7.1f}"
            f"{first / samples.median:>19.2f}×"
        )


def main(argv=None):
    parser = _timing.benchmark_parser(__doc__.split("\n\n")[0], default_repeats=11,
                                      unit="formulation")
    parser.add_argument("--only", nargs="+", choices=list(FORMULATIONS), default=None,
                        help="time only these formulations (the first is the ratios' base)")
    parser.add_argument("--passes", nargs="+", choices=("forward", "backward"),
                        default=("forward", "backward"))
    args = parser.parse_args(argv)
    tf.get_logger().setLevel("ERROR")  # one tf.function per formulation: retracing expected
    args.repeats = args.repeats or (_timing.QUICK_REPEATS if args.quick else 11)
    args.warmup = 2 if args.quick else 3
    args.min_sample = 0.02 if args.quick else 0.1
    names = args.only or list(FORMULATIONS)
    print(f"sums_bench: TensorFlow {tf.__version__}; {len(os.sched_getaffinity(0))} CPU cores; "
          f"{args.repeats} interleaved samples per formulation, medians"
          + ("  [--quick: noisy]" if args.quick else ""))
    for shape in SHAPES:
        for pass_name in args.passes:
            run(shape, pass_name, names, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
