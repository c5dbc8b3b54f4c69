"""Host check of the CUDA attention kernels' index math, no GPU needed: compiles
tests/cpp/attention_index_check.cpp (csrc/common/attention_index.h with the host compiler) and runs
it. It checks the dropout keep-pairs against the CPU op's predicate, the causal block ranges, the
shared-memory swizzle (bijective, no ldmatrix bank conflicts) and that the ldmatrix lane maps give
the mma.m16n8k16 fragments of the PTX ISA (ldmatrix emulated on the host)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_attention_index_math_on_host(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler (c++ / g++) to build the host check")
    exe = tmp_path / "attention_index_check"
    src = os.path.join(ROOT, "tests", "cpp", "attention_index_check.cpp")
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-I", os.path.join(ROOT, "csrc"), src, "-o", str(exe)],
                   check=True, capture_output=True, text=True, timeout=300)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
