"""Host check of the CUDA attention kernels' index math, no GPU needed: compiles
tests/cpp/attention_index_check.cpp (csrc/common/attention_index.h with the host compiler) and runs
it. It checks the dropout keep-pairs against the CPU op's predicate, the causal block ranges, the
shared-memory swizzle (bijective, no ldmatrix bank conflicts) and that the ldmatrix lane maps give
the mma.m16n8k16 fragments of the PTX ISA (ldmatrix emulated on the host)."""

from conftest import run_host_check


def test_attention_index_math_on_host(tmp_path):
    run_host_check(tmp_path, "attention_index_check")
