"""Benchmarks of aiayn's ops against their PyTorch equivalents (``python -m aiayn.bench`` or
``aiayn bench``; ``--help`` for the options).

    from aiayn import bench
    results = bench.run(bench.select("add_dropout_layer_norm"), device="cpu", repeats=10)

Cases live in aiayn/bench/cases.py (``register`` adds one); machine peaks in peak.py; the
interleaved timer in timing.py.
"""

import statistics

import torch

from . import peak
from .cases import CASES, Bench, Case, register, select
from .timing import time_interleaved

__all__ = ["CASES", "Bench", "Case", "register", "select", "run", "run_case", "peak", "time_interleaved"]


def run_case(case, dtype, device, *, repeats, peaks, quick=False, warmup=3, min_sample_s=0.02):
    """Time one case at one dtype on one device; returns a JSON-able dict (``status`` "ok",
    "skipped" where aiayn's op has no kernel for the device, or "error")."""
    result = {"name": case.name, "label": case.label, "dtype": str(dtype).removeprefix("torch."), "device": device}
    torch.manual_seed(0)
    try:
        b = case.make(torch.device(device), dtype, quick)
        result["shape"] = list(b.shape)
        result["baseline"] = case.baseline
        ours, theirs = time_interleaved([b.aiayn, b.torch], device=device, repeats=repeats, warmup=warmup,
                                        min_sample_s=min_sample_s)
    except NotImplementedError as e:  # e.g. "Could not run 'aiayn::...' with arguments from the 'CUDA' backend"
        return {**result, "status": "skipped", "error": str(e).splitlines()[0]}
    except Exception as e:  # a broken case must not hide the others: reported, and the exit status is 1
        return {**result, "status": "error", "error": f"{type(e).__name__}: {e}"}
    a, t = statistics.median(ours), statistics.median(theirs)
    result.update(status="ok", aiayn_ms=a * 1e3, torch_ms=t * 1e3, speedup=t / a,
                  aiayn_samples_ms=[s * 1e3 for s in ours], torch_samples_ms=[s * 1e3 for s in theirs],
                  flops=b.flops, bytes=b.bytes)
    pct = {}  # aiayn's % of each peak that applies
    if b.flops:
        result.update(gflops=b.flops / a / 1e9, torch_gflops=b.flops / t / 1e9)
        if peak.peak_for(peaks, dtype):
            if b.flops / a > peak.peak_for(peaks, dtype):
                # Nothing runs faster than the peak: the cached one was measured on a busy machine.
                old, new = peak.raise_peak(peaks, dtype, b.flops / a)
                result["peak_raised"] = {"from": old, "to": new}
            pct[f"{result['dtype']} peak"] = 100 * b.flops / a / peak.peak_for(peaks, dtype)
    if b.bytes:
        result.update(gbps=b.bytes / a / 1e9, torch_gbps=b.bytes / t / 1e9)
        pct["bandwidth"] = 100 * b.bytes / a / peaks["bandwidth"]
    if pct:  # the binding one, as on a roofline
        result["peak_kind"], result["pct_peak"] = max(pct.items(), key=lambda kv: kv[1])
    return result


def run(cases, device="cpu", *, repeats=25, quick=False, peaks=None, on_result=None, **timing):
    """Run every case at each of its dtypes on ``device``; returns the list of results.
    ``peaks`` defaults to ``peak.peaks(device)``; ``on_result(result)`` is called as each case
    finishes (the CLI prints table rows with it)."""
    peaks = peaks or peak.peaks(device)
    results = []
    for case in cases:
        for dtype in case.dtypes:
            result = run_case(case, dtype, device, repeats=repeats, peaks=peaks, quick=quick, **timing)
            results.append(result)
            if on_result:
                on_result(result)
    return results
