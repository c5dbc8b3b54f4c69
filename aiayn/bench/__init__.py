"""Benchmarks of aiayn's ops against their PyTorch equivalents (``python -m aiayn.bench`` or
``aiayn bench``; ``--help`` for the options).

    from aiayn import bench
    results = bench.run(bench.select("add_dropout_layer_norm"), device="cpu", repeats=10)

Cases live in aiayn/bench/cases.py (``register`` adds one); machine peaks in peak.py; the
interleaved timer in timing.py.
"""

import statistics
import time

import torch

from . import peak
from .cases import CASES, Bench, Case, Engine, Engines, register, select
from .timing import time_interleaved

__all__ = ["CASES", "Bench", "Case", "Engine", "Engines", "register", "select", "run", "run_case", "run_engines", "peak",
           "time_interleaved"]

# A translate case's sample is a whole pass over its sentences (seconds to minutes): a few suffice.
MAX_ENGINE_PASSES = 3


def run_engines(b, *, passes, warmup_sentences=32):
    """Times the :class:`Engines` of a translate case: each engine first translates the first
    ``warmup_sentences`` (weights packed, buffers allocated), then ``passes`` rounds translate all the
    sentences with every engine in turn (interleaved, as the op cases are). Returns one row per
    engine: median seconds per pass, sentences/s, target tokens/s (EOS counted, as aiayn translate
    counts them), and the fraction of outputs identical to the reference engine's."""
    live = [e for e in b.engines if e.translate is not None]
    for e in live:
        e.translate(b.src_ids[:warmup_sentences])
    samples, outputs = {e.name: [] for e in live}, {}
    for _ in range(passes):
        for e in live:
            start = time.perf_counter()
            hyps = e.translate(b.src_ids)
            samples[e.name].append(time.perf_counter() - start)
            outputs.setdefault(e.name, hyps)
    reference = outputs.get(b.reference)
    rows = []
    for e in b.engines:
        if e.translate is None:
            rows.append({"engine": e.name, "status": "skipped", "note": e.note})
            continue
        seconds = statistics.median(samples[e.name])
        hyps = outputs[e.name]
        tokens = sum(len(h) + 1 for h in hyps)
        row = {"engine": e.name, "status": "ok", "seconds": seconds, "samples_s": samples[e.name],
               "sentences_per_s": len(hyps) / seconds, "target_tokens": tokens, "tokens_per_s": tokens / seconds}
        if reference is not None:
            row["agreement"] = sum(a == r for a, r in zip(hyps, reference)) / len(hyps)
        if e.note:
            row["note"] = e.note
        rows.append(row)
    return rows


def run_case(case, dtype, device, *, repeats, peaks, quick=False, warmup=3, min_sample_s=0.02):
    """Time one case at one dtype on one device; returns a JSON-able dict (``status`` "ok",
    "skipped" where aiayn's op has no kernel for the device, or "error")."""
    result = {"name": case.name, "label": case.label, "dtype": str(dtype).removeprefix("torch."), "device": device}
    torch.manual_seed(0)
    try:
        b = case.make(torch.device(device), dtype, quick)
        result["shape"] = list(b.shape)
        result["baseline"] = case.baseline
        if isinstance(b, Engines):
            passes = 1 if quick else max(1, min(repeats, MAX_ENGINE_PASSES))
            engines = run_engines(b, passes=passes)
            return {**result, "status": "ok", "kind": "engines", "setting": b.setting, "sentences": len(b.src_ids),
                    "passes": passes, "reference": b.reference, "engines": engines, "notes": b.notes}
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
