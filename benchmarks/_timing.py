"""Shared timing helpers for the benchmark scripts: interleaved medians and a bandwidth probe.

Why interleave: on a shared or thermally throttled machine the speed drifts over a run. Timing
variant A for a minute and then variant B for a minute puts the drift into the A/B ratio;
running one sample of every variant per round (round-robin, rotating which goes first) spreads
the drift over all of them, and the median drops the outlier rounds.

Why a copy probe: a training-mode BN step does almost no arithmetic per byte, so its honest
lower bound is "bytes it must move / bytes per second this machine can move". A large copy is
the simplest kernel that moves bytes at full speed with the same read-and-write mix.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


def calibrate(fn: Callable[[], object], min_seconds: float) -> int:
    """How many back-to-back calls of `fn` make one sample last at least `min_seconds`.

    Short steps (the dense case runs in well under a millisecond) are timed in batches of calls
    so that timer resolution and scheduler jitter are small against the sample.
    """
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or number >= 1 << 16:
            return number
        # Aim 20 % past the target so the next try usually is the last one.
        number = max(number + 1, int(number * 1.2 * min_seconds / max(elapsed, 1e-9)))


@dataclass
class Samples:
    """Per-call seconds of one variant: wall clock, and CPU time of the whole process.

    CPU time counts every thread, so cpu/wall is about how many cores a variant kept busy; on a
    machine shared with other jobs it is also the steadier of the two (waiting for a core is not
    counted), which helps read a noisy run. The figures to report are the wall-clock medians.
    """

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def spread(self) -> float:
        """Interquartile range of the wall times relative to their median: how noisy it was."""
        if len(self.wall) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.wall, n=4)
        return (q3 - q1) / self.median


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def interleaved_times(
    variants: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 3,
    min_sample_seconds: float = 0.05,
) -> dict[str, Samples]:
    """Seconds per call of each variant: `repeats` samples each, taken round-robin.

    Every variant is first called `warmup` times (tracing, XLA compilation and allocator growth
    happen there, not in a sample) and calibrated on its own number of calls per sample. Round r
    starts with variant r mod n, so no variant always runs right after the same neighbour.
    """
    names = list(variants)
    numbers = {}
    for name in names:
        for _ in range(warmup):
            variants[name]()
        numbers[name] = calibrate(variants[name], min_sample_seconds)
    samples = {name: Samples() for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, number = variants[name], numbers[name]
            cpu, start = _cpu_seconds(), time.perf_counter()
            for _ in range(number):
                fn()
            samples[name].wall.append((time.perf_counter() - start) / number)
            samples[name].cpu.append((_cpu_seconds() - cpu) / number)
    return samples


def format_ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.3f} ms"


def pass_fail(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def copy_bandwidth(nbytes: int, *, repeats: int = 15, threads: int | None = None) -> float:
    """Bytes per second of a NumPy copy of an `nbytes` float32 array, counting read + write.

    A copy reads every byte once and writes it once, so it moves 2·nbytes; BN passes also read
    and write whole tensors, so "bytes moved / this figure" is the time an ideal BN pass would
    take. The array is split over `threads` threads (default: every core the process may use;
    NumPy releases the GIL while copying) because TensorFlow's kernels run on all cores too.
    Measured at the benchmark tensor's own size: a 1 MB tensor lives in cache and a 25 MB one
    does not, and the floor should use the bandwidth that tensor actually sees. Best-of
    `repeats`: a bound is about what the machine can do, not about its bad moments. It is a
    strict reference: for large copies glibc's memcpy may use streaming stores, which skip the
    read-before-write an ordinary store makes, so compiled kernels rarely reach it.
    """
    threads = threads or len(os.sched_getaffinity(0))
    n = max(nbytes // 4, threads)
    src = np.random.default_rng(0).random(n, dtype=np.float32)
    dst = np.empty_like(src)
    chunks = list(zip(np.array_split(src, threads), np.array_split(dst, threads), strict=True))

    def copy_chunk(pair):
        np.copyto(pair[1], pair[0])

    def copy_all():
        if threads == 1:
            copy_chunk(chunks[0])
        else:
            list(pool.map(copy_chunk, chunks))

    with ThreadPoolExecutor(threads) as pool:
        for _ in range(2):  # untimed: page in dst, start the threads
            copy_all()
        # Small arrays copy in microseconds: batch calls as the step timings do.
        number = calibrate(copy_all, 0.005)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(number):
                copy_all()
            best = min(best, (time.perf_counter() - start) / number)
    return 2 * src.nbytes / best


def best_copy_bandwidth(nbytes: int, *, repeats: int = 15) -> tuple[float, int]:
    """(bytes/s, threads) of the faster of a one-thread and an all-cores copy.

    Thread start-up can cost more than a small copy saves, so both are tried and the better one
    is the reference (the tighter floor).
    """
    candidates = sorted({1, len(os.sched_getaffinity(0))})
    results = [(copy_bandwidth(nbytes, repeats=repeats, threads=t), t) for t in candidates]
    return max(results)


QUICK_REPEATS = 5


def benchmark_parser(description: str, *, default_repeats: int, unit: str = "variant"):
    """The arguments every benchmark script shares: `--quick` and `--repeats`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: {QUICK_REPEATS} repeats of short samples "
                             "(noisy, not for records)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"samples per {unit} for the medians (default {default_repeats}, "
                             f"--quick {QUICK_REPEATS})")
    return parser
