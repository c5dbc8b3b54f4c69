"""Measured machine peaks, the denominators of the benchmark's "% of peak" column.

    flops[dtype]  floating-point operations per second (an FMA counts 2) for float32, bfloat16, ...
    bandwidth     bytes per second of a streaming copy of a large buffer (read + write bytes)

Measured once per machine and cached as JSON in $AIAYN_CACHE_DIR (default
$XDG_CACHE_HOME/aiayn or ~/.cache/aiayn), in a file named after a hash of what determines the
peaks: CPU model, thread count, CPU ISA variant and bf16 mode (or the GPU's name). ``remeasure=True``
(``--remeasure``) measures again.

A peak measured while another program used the CPU is too low, and every later run would read it
from the cache and print more than 100% of it. So a peak is never trusted further than the
evidence: each run on the CPU checks the cached float32 peak with a short probe (~0.15 s) and
measures everything again when the probe beats it; a case that runs faster than the cached peak
raises the peak to what it reached (or to a new probe, whichever is higher) in the cache; and a
probe far below the cached peak is reported as a busy machine instead of replacing a good value.
"""

import hashlib
import json
import os
import platform
import time

import torch

from .timing import time_calls

_CPU_PROBE_S = 0.2  # target duration of one run of a CPU FLOP probe
_CPU_CHECK_S = 0.05  # target duration of one run of the check of a cached peak
_RAISE_ABOVE = 1.05  # a check this much faster than the cached peak means the cache is too low
_BUSY_BELOW = 0.75  # a check this much slower than the cached peak means something else is running
_CPU_COPY_BYTES = 256 << 20  # >= 256 MB: far beyond the last-level cache
_CUDA_COPY_BYTES = 2 << 30
_CUDA_MATMUL_N = 8192


def cache_dir():
    if os.environ.get("AIAYN_CACHE_DIR"):
        return os.environ["AIAYN_CACHE_DIR"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "aiayn")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device):
    """A description of what determines the peaks of ``device`` ("cpu" or "cuda")."""
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {"device": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                "memory_bytes": props.total_memory}
    import aiayn

    return {"device": "cpu", "name": cpu_model(), "threads": torch.get_num_threads(), "cpu_isa": aiayn._C.cpu_isa(),
            "bf16": aiayn._C.gemm_bf16()}


def _cache_path(info):
    key = hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir(), f"peaks-{key}.json")


_PER_RUN_KEYS = ("cache", "cached", "warning", "raised", "corrected_from")  # said once, not cached


def _write_cache(path, result):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({k: v for k, v in result.items() if k not in _PER_RUN_KEYS}, f, indent=2)
    os.replace(tmp, path)  # atomic: concurrent runs never read half a file


def _busy_note():
    """The 1-minute load average against the core count, where the OS tells it."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    return f"; load average {load:.1f} on {os.cpu_count()} cores"


def peaks(device="cpu", remeasure=False, check=True):
    """The cached peaks of ``device``, measured first if there are none (or ``remeasure``).

    On the CPU a cached value is checked first (``check``): a short float32 probe that beats it by
    more than 5% means it was measured on a busy machine, and everything is measured again; one
    below 75% of it means the machine is busy now, said in ``warning``.

    Returns {"machine": ..., "flops": {dtype name: FLOP/s}, "bandwidth": bytes/s, "measured_at": ...,
    "seconds": how long measuring took, "cache": the JSON file, "cached": whether it was read from it,
    and "corrected_from" (the stale float32 peak replaced) or "warning" (a busy machine) when so}.
    """
    info = machine(device)
    path = _cache_path(info)
    cached = None
    if not remeasure and os.path.exists(path):
        try:
            with open(path) as f:
                cached = json.load(f)
            if cached.get("machine") != info:
                cached = None
        except (OSError, ValueError):
            cached = None  # unreadable cache: measure again
    corrected_from = warning = None
    if cached is not None:
        result = {**cached, "cache": path, "cached": True}
        if not check or info["device"] != "cpu":
            return result
        from aiayn import _C

        old = (cached.get("flops") or {}).get("float32") or 0.0
        probe = _probe_flops(_C.peak_fp32_fma, target_s=_CPU_CHECK_S)
        if probe <= old * _RAISE_ABOVE:
            if probe < old * _BUSY_BELOW:
                result["warning"] = (f"the machine looks busy: a float32 probe ran at {probe / 1e9:.0f} GFLOP/s, "
                                     f"{100 * probe / old:.0f}% of the cached peak{_busy_note()}; timings may be slow "
                                     "and noisy")
            return result
        corrected_from = old
    t0 = time.perf_counter()
    measured = measure_cuda() if info["device"] == "cuda" else measure_cpu()
    if corrected_from is not None:
        # Keep the larger of old and new per peak: a busy moment during this measurement must not
        # undo what an earlier quiet one found.
        for name, value in (cached.get("flops") or {}).items():
            if value and (measured["flops"].get(name) or 0) < value:
                measured["flops"][name] = value
        measured["bandwidth"] = max(measured["bandwidth"], cached.get("bandwidth") or 0)
    elif info["device"] == "cpu":
        warning = _measured_while_busy(measured)
    result = {"machine": info, **measured, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "seconds": round(time.perf_counter() - t0, 3)}
    if corrected_from is not None:
        result["corrected_from"] = corrected_from
    _write_cache(path, result)
    result = {**result, "cache": path, "cached": False}
    if warning:
        result["warning"] = warning
    return result


def _measured_while_busy(measured):
    """A warning when the float32 probes of a fresh measurement disagree (another program took the
    CPU for part of the time), else None."""
    runs = measured.get("float32_runs") or []
    if len(runs) >= 2 and min(runs) < _BUSY_BELOW * max(runs):
        return (f"the machine looked busy while the peaks were measured (float32 probes from {min(runs) / 1e9:.0f} "
                f"to {max(runs) / 1e9:.0f} GFLOP/s{_busy_note()}); the best is kept and later runs correct it, or "
                "rerun with --remeasure on a quiet machine")
    return None


def raise_peak(peaks_, dtype, observed):
    """Called when a case reached ``observed`` FLOP/s in ``dtype``, above the peak in ``peaks_``:
    a peak is an upper bound, so the cached one was measured on a busy machine. Probes again and
    sets the peak to the larger of the probe and ``observed``, in ``peaks_`` and in its cache file;
    returns (old, new)."""
    name = str(dtype).removeprefix("torch.")
    old = peaks_["flops"].get(name)
    new = observed
    if peaks_["machine"]["device"] == "cpu":
        probe = _cpu_probe_for(name)
        if probe is not None:
            new = max(new, _probe_flops(probe))
    peaks_["flops"][name] = new
    if name == "bfloat16":  # keep the instruction-specific entry the alias stands for in step
        from aiayn import _C

        peaks_["flops"]["bfloat16_amx" if _C.gemm_bf16() == "amx" else "bfloat16_dot"] = new
    raised = peaks_.setdefault("raised", {})
    raised.setdefault(name, old)
    if peaks_.get("cache"):
        try:
            _write_cache(peaks_["cache"], peaks_)
        except OSError:
            pass  # a read-only cache: the run still prints correct percentages
    return old, new


def _cpu_probe_for(name):
    from aiayn import _C

    if name == "float32":
        return _C.peak_fp32_fma
    if name == "bfloat16":
        return _C.peak_bf16_amx if _C.gemm_bf16() == "amx" else _C.peak_bf16_dot
    return None


def peak_for(peaks_, dtype):
    """The FLOP/s peak that applies to ``dtype`` (a torch.dtype or its name), or None."""
    name = str(dtype).removeprefix("torch.")
    return peaks_["flops"].get(name)


# --- CPU -------------------------------------------------------------------------------------


def _probe_runs(probe, tries=5, target_s=_CPU_PROBE_S):
    """FLOP/s of ``tries`` runs of ``probe(iters) -> (seconds, flops)``, iters sized for ~target_s."""
    iters = 1000
    seconds, _ = probe(iters)
    while seconds < 0.01:
        iters *= 10
        seconds, _ = probe(iters)
    iters = max(1, int(iters * target_s / seconds))
    return [flops / seconds for seconds, flops in (probe(iters) for _ in range(tries))]


def _probe_flops(probe, tries=3, target_s=_CPU_PROBE_S):
    """Best FLOP/s of ``tries`` runs of ``probe``: another program can only slow a run down."""
    return max(_probe_runs(probe, tries, target_s))


def _copy_bandwidth(device, nbytes, tries):
    """Bytes per second of ``dst.copy_(src)`` for ``nbytes`` buffers, counting read + write."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: fault the pages in before timing
    best = min(time_calls(lambda: dst.copy_(src), 1, device) for _ in range(tries))
    return 2 * nbytes / best


def measure_cpu():
    """fp32 FMA and bf16 throughput of aiayn's probes (csrc/cpu/peak_kernel.h, isa/avx512.cpp) on
    all threads, best of 5 (float32) or 3 runs of ~0.2 s each. bfloat16 is the peak of the instruction the bf16
    kernels use now: AMX's tdpbf16ps where they run on AMX tiles, else vdpbf16ps (None where the
    CPU ISA has neither); both are kept, as "bfloat16_amx" and "bfloat16_dot". Bandwidth: best of 5
    torch copies of a 256 MiB buffer."""
    from aiayn import _C

    float32_runs = _probe_runs(_C.peak_fp32_fma, tries=5)
    flops = {"float32": max(float32_runs)}
    for name, probe in (("bfloat16_dot", _C.peak_bf16_dot), ("bfloat16_amx", _C.peak_bf16_amx)):
        try:
            flops[name] = _probe_flops(probe)
        except RuntimeError:  # this ISA variant (or CPU) has no such probe
            flops[name] = None
    flops["bfloat16"] = flops["bfloat16_amx"] if _C.gemm_bf16() == "amx" else flops["bfloat16_dot"]
    return {"flops": flops, "bandwidth": _copy_bandwidth("cpu", _CPU_COPY_BYTES, tries=5),
            "float32_runs": float32_runs}


# --- CUDA ------------------------------------------------------------------------------------


def _matmul_flops(dtype, n=_CUDA_MATMUL_N, tries=5):
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b  # warm-up: cuBLAS heuristics, clocks
    return 2 * n**3 / min(time_calls(lambda: a @ b, 1, "cuda") for _ in range(tries))


def measure_cuda():
    """Tensor-core peak from an n^3 matmul (n = 8192) in bf16 and fp16, fp32 from the same matmul
    with TF32 off; bandwidth from a 2 GiB device-to-device copy, counting read + write.

    UNVERIFIED: written without a GPU at hand (the machine this harness was developed on has none);
    check the numbers against the card's datasheet the first time it runs on one.
    """
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        flops = {name: _matmul_flops(dtype) for name, dtype in
                 (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16))}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    bandwidth = _copy_bandwidth("cuda", _CUDA_COPY_BYTES, tries=5)
    torch.cuda.empty_cache()
    return {"flops": flops, "bandwidth": bandwidth}
