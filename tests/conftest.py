"""Shared test helpers: the ISA variants this CPU can run, fresh random inputs, the
flash-attention style "2x rule" for comparing against a float64 reference, and the host check
programs of tests/cpp."""

import os
import random
import shutil
import subprocess

import pytest
import torch

import aiayn

ISAS = [isa for isa in ("avx512", "avx2", "generic") if aiayn._C.cpu_isa_supported(isa)]


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test once per CPU ISA variant this machine supports."""
    with aiayn.cpu_isa(request.param):
        yield request.param


AMX_SKIP_REASON = None if aiayn._C.amx_supported() else "no AMX-BF16 here (CPU lacks it, or the OS refused the tile state)"

# The bf16 GEMM modes of the AVX-512 kernels, as aiayn._C.set_gemm_bf16 takes them.
BF16_MODES = {"avx512": 1, "avx512-bf16-widened": 0, "avx512-amx": 2}


class num_threads:
    """Sets torch's intra-op thread count in a block (tests that compare results across counts)."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.previous)


class bf16_mode:
    """Forces a bf16 mode (aiayn._C.set_gemm_bf16: GEMMs and attention) and optionally the
    GEMM forward's packed / rows path in a block."""

    def __init__(self, mode, rows_path=-1):
        self.mode, self.rows_path = mode, rows_path

    def __enter__(self):
        self.previous = aiayn._C.set_gemm_bf16(self.mode)
        self.previous_path = aiayn._C.set_gemm_rows_path(self.rows_path)

    def __exit__(self, *exc):
        aiayn._C.set_gemm_bf16(self.previous)
        aiayn._C.set_gemm_rows_path(self.previous_path)


@pytest.fixture(params=[
    pytest.param(isa, marks=pytest.mark.skipif(isa == "avx512-amx" and AMX_SKIP_REASON is not None,
                                               reason=AMX_SKIP_REASON or ""))
    for isa in ("avx512", "avx512-bf16-widened", "avx512-amx", "avx2", "generic")
    if aiayn._C.cpu_isa_supported(isa.split("-")[0])])
def isa_bf16(request):
    """Like `isa`, with every bf16 GEMM mode of AVX-512: vdpbf16ps ("avx512"), widened to float32,
    and AMX tiles (skipped where the CPU or OS lacks AMX). The automatic mode picks AMX where
    supported, else the faster of the other two; all are tested."""
    name = request.param.split("-")[0]
    previous = aiayn._C.set_gemm_bf16(BF16_MODES.get(request.param, 0))
    try:
        with aiayn.cpu_isa(name):
            yield request.param
    finally:
        aiayn._C.set_gemm_bf16(previous)


@pytest.fixture(params=["rows", "packed"])
def gemm_path(request):
    """Forces the forward GEMMs of linear / feed_forward onto the dot-product path straight from
    the weight's rows ("rows", normally taken by few rows of x) or onto the packed weight."""
    previous = aiayn._C.set_gemm_rows_path(1 if request.param == "rows" else 0)
    try:
        yield request.param
    finally:
        aiayn._C.set_gemm_rows_path(previous)


@pytest.fixture
def rng_seed():
    """A fresh seed per test (inputs differ every run); printed on failure to reproduce."""
    seed = int(os.environ.get("AIAYN_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(seed)
    return seed


def assert_2x_rule(ours, theirs, ref, what, slack=1e-6, seed=None):
    """Our max error vs the float64 reference must be at most 2x PyTorch's own error in the same
    dtype, plus a tiny absolute slack."""
    ref = ref.double()
    err_ours = (ours.double() - ref).abs().max().item() if ref.numel() else 0.0
    err_torch = (theirs.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert not torch.isnan(ours).any(), f"{what}: NaN in output (seed {seed})"
    assert err_ours <= 2 * err_torch + slack, (
        f"{what}: max error {err_ours:.3e} > 2 x torch's {err_torch:.3e} + {slack:g} (seed {seed})")


def run_host_check(tmp_path, name):
    """Compiles tests/cpp/<name>.cpp with the host compiler (C++17, csrc/ on the include path; see
    tests/cpp/host_check.h) and runs it; it must print "ok". Skips without a C++ compiler."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler (c++ / g++) to build the host check")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = tmp_path / name
    src = os.path.join(root, "tests", "cpp", f"{name}.cpp")
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-I", os.path.join(root, "csrc"), src, "-o", str(exe)],
                   check=True, capture_output=True, text=True, timeout=300)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
