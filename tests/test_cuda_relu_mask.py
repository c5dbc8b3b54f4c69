"""Host check of feed_forward's CUDA ReLU bit-mask, no GPU needed: compiles tests/cpp/relu_mask_check.cpp
(csrc/common/relu_mask.h and cuda/dropout.cuh with the host compiler) and runs it. It checks that the
mask's leading dimension meets cuBLASLt's rule (bits, a multiple of 128), that element (t, j) of the
row-major hidden activation sits at the bit cuBLASLt's column-major bit matrix gives it, and that the
pass after GEMM1 (the same per-byte function the kernel runs) turns a RELU_AUX mask into exactly
[pre-activation > 0] & keep with the CPU op's Philox keep mask. Whether cuBLASLt really writes and
reads that layout is only checked on a GPU (test_cuda_feed_forward.py)."""

from conftest import run_host_check


def test_relu_mask_layout_and_dropout_fold_on_host(tmp_path):
    run_host_check(tmp_path, "relu_mask_check")
