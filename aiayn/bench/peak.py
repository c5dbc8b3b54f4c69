"""Measured machine peaks, the denominators of the benchmark's "% of peak" column.

    flops[dtype]  floating-point operations per second (an FMA counts 2) for float32, bfloat16, ...
    bandwidth     bytes per second of a streaming copy of a large buffer (read + write bytes)

Measured once per machine and cached as JSON in $AIAYN_CACHE_DIR (default
$XDG_CACHE_HOME/aiayn or ~/.cache/aiayn), in a file named after a hash of what determines the
peaks: CPU model, thread count, CPU ISA variant and bf16 mode (or the GPU's name). ``remeasure=True``
(``--remeasure``) measures again.
"""

import hashlib
import json
import os
import platform
import time

import torch

from .timing import time_calls

_CPU_PROBE_S = 0.2  # target duration of one run of a CPU FLOP probe
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


def peaks(device="cpu", remeasure=False):
    """The cached peaks of ``device``, measured first if there are none (or ``remeasure``).

    Returns {"machine": ..., "flops": {dtype name: FLOP/s}, "bandwidth": bytes/s, "measured_at": ...,
    "seconds": how long measuring took, "cache": the JSON file, "cached": whether it was read from it}.
    """
    info = machine(device)
    key = hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir(), f"peaks-{key}.json")
    if not remeasure and os.path.exists(path):
        try:
            with open(path) as f:
                result = json.load(f)
            if result.get("machine") == info:
                return {**result, "cache": path, "cached": True}
        except (OSError, ValueError):
            pass  # unreadable cache: measure again
    t0 = time.perf_counter()
    measured = measure_cuda() if info["device"] == "cuda" else measure_cpu()
    result = {"machine": info, **measured, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "seconds": round(time.perf_counter() - t0, 3)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)  # atomic: concurrent runs never read half a file
    return {**result, "cache": path, "cached": False}


def peak_for(peaks_, dtype):
    """The FLOP/s peak that applies to ``dtype`` (a torch.dtype or its name), or None."""
    name = str(dtype).removeprefix("torch.")
    return peaks_["flops"].get(name)


# --- CPU -------------------------------------------------------------------------------------


def _probe_flops(probe, tries=3):
    """Best FLOP/s of ``probe(iters) -> (seconds, flops)`` with iters sized for a ~0.2 s run."""
    iters = 1000
    seconds, _ = probe(iters)
    while seconds < 0.02:
        iters *= 10
        seconds, _ = probe(iters)
    iters = max(1, int(iters * _CPU_PROBE_S / seconds))
    return max(flops / seconds for seconds, flops in (probe(iters) for _ in range(tries)))


def _copy_bandwidth(device, nbytes, tries):
    """Bytes per second of ``dst.copy_(src)`` for ``nbytes`` buffers, counting read + write."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: fault the pages in before timing
    best = min(time_calls(lambda: dst.copy_(src), 1, device) for _ in range(tries))
    return 2 * nbytes / best


def measure_cpu():
    """fp32 FMA and bf16 throughput of aiayn's probes (csrc/cpu/peak_kernel.h, isa/avx512.cpp) on
    all threads, best of 3 runs of ~0.2 s each. bfloat16 is the peak of the instruction the bf16
    kernels use now: AMX's tdpbf16ps where they run on AMX tiles, else vdpbf16ps (None where the
    CPU ISA has neither); both are kept, as "bfloat16_amx" and "bfloat16_dot". Bandwidth: best of 5
    torch copies of a 256 MiB buffer."""
    from aiayn import _C

    flops = {"float32": _probe_flops(_C.peak_fp32_fma)}
    for name, probe in (("bfloat16_dot", _C.peak_bf16_dot), ("bfloat16_amx", _C.peak_bf16_amx)):
        try:
            flops[name] = _probe_flops(probe)
        except RuntimeError:  # this ISA variant (or CPU) has no such probe
            flops[name] = None
    flops["bfloat16"] = flops["bfloat16_amx"] if _C.gemm_bf16() == "amx" else flops["bfloat16_dot"]
    return {"flops": flops, "bandwidth": _copy_bandwidth("cpu", _CPU_COPY_BYTES, tries=5)}


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
