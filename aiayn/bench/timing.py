"""Timing: seconds per call of competing callables, measured interleaved (a, b, a, b, ...) so that
drifts of the machine (clock frequency, other tenants, thermal state) hit every competitor alike.

CPU samples use time.perf_counter; CUDA samples use CUDA events recorded around the calls and a
synchronize at the end of each sample.
"""

import gc
import math
import time

import torch


def time_calls(fn, number, device):
    """Seconds per call of ``number`` back-to-back calls of ``fn`` on ``device``."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number  # elapsed_time is in milliseconds
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def time_interleaved(fns, *, device, repeats, warmup=3, min_sample_s=0.01):
    """Per-call seconds of each callable in ``fns``: one list of ``repeats`` samples per callable.

    Each callable first runs ``warmup`` times; then ``repeats`` rounds run one sample of each
    callable in turn. A sample is ``number`` back-to-back calls, ``number`` chosen per callable so a
    sample lasts at least ``min_sample_s`` (amortises the timer and, on CUDA, the launch gaps).
    Python's garbage collector is off during the rounds, as in ``timeit``.
    """
    numbers = []
    for fn in fns:
        for _ in range(warmup):
            fn()
        once = time_calls(fn, 1, device)
        numbers.append(max(1, math.ceil(min_sample_s / max(once, 1e-9))))
    samples = [[] for _ in fns]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for fn, number, out in zip(fns, numbers, samples):
                out.append(time_calls(fn, number, device))
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples
