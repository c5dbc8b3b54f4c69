"""The CUDA attention kernels run on the CPU, no GPU needed: tests/cpp/attention_kernels_emulation.cpp
compiles csrc/cuda/attention_{simt,fwd,bwd}_kernel.cuh with the host compiler, one std::thread per
CUDA thread, with the warp shuffles, barriers, cp.async, ldmatrix and mma.sync emulated from the PTX
ISA's definitions. The SIMT kernels run in float64 (forward with and without split-K, the split
merge, the backward) and must match aiayn.reference and the CPU op to 1e-10; the tensor-core kernels
run in float16 / bfloat16 and must match the float64 reference within those dtypes' rounding. Both
use the CPU op's dropout mask for the same seed. This checks masks, causal ranges, dropout
numbering, NaN / fully-masked rules, fragment layouts, tiling and the backward formulas; what only a
GPU can check (real instruction behaviour, races, launch, speed) is in test_cuda_attention.py."""

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from aiayn import functional as AF
from aiayn import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK_KINDS = {"none": 0, "bool": 1, "float": 2}


def _cuda_include():
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and os.path.exists(os.path.join(base, "include", "cuda_fp16.h")):
            return os.path.join(base, "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        inc = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")
        if os.path.exists(os.path.join(inc, "cuda_fp16.h")):
            return inc
    return None


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    inc = _cuda_include()
    if not cxx or not inc:
        pytest.skip("needs a C++20 compiler and the CUDA headers (cuda_fp16.h) to build the host emulation")
    exe = tmp_path_factory.mktemp("emu") / "attention_kernels_emulation"
    src = os.path.join(ROOT, "tests", "cpp", "attention_kernels_emulation.cpp")
    build = subprocess.run([cxx, "-std=c++20", "-O1", "-Wall", "-Wno-attributes", "-Wno-unknown-pragmas",
                            "-I", os.path.join(ROOT, "csrc"), "-I", inc, src, "-o", str(exe), "-pthread"],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    return str(exe)


def _write(path, t):
    t.detach().double().contiguous().numpy().tofile(path)


def _read(path, shape):
    return torch.from_numpy(np.fromfile(path, dtype=np.float64).reshape(shape))


def run_emulated(exe, tmp, q, k, v, grad, attn_mask, kpm, p, causal, scale, seed, splits=1, split_keys=0, mode="simt"):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    kind = "none" if attn_mask is None else ("bool" if attn_mask.dtype == torch.bool else "float")
    mshape = [1, 1, 1, 1]
    if attn_mask is not None:
        m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        mshape = list(m.shape)
        _write(tmp / "mask", m.double())
    if kpm is not None:
        _write(tmp / "key_padding", kpm.double())
    for name, t in (("q", q), ("k", k), ("v", v), ("grad_out", grad)):
        _write(tmp / name, t)
    (tmp / "params.txt").write_text(" ".join(str(x) for x in [
        B, H, Lq, Lk, D, repr(float(scale)), int(causal), repr(float(p)), int(seed.item()), MASK_KINDS[kind], *mshape,
        int(kpm is not None), splits, split_keys]))
    run = subprocess.run([exe, str(tmp), mode], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return (_read(tmp / "out", (B, H, Lq, D)), _read(tmp / "lse", (B, H, Lq)), _read(tmp / "grad_q", (B, H, Lq, D)),
            _read(tmp / "grad_k", (B, H, Lk, D)), _read(tmp / "grad_v", (B, H, Lk, D)))


def reference_lse(q, k, attn_mask, kpm, causal, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    Lq, Lk = s.shape[-2:]
    visible = torch.ones(Lq, Lk, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    visible = visible.expand(s.shape)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            s = s + attn_mask.double()
    if kpm is not None:
        visible = visible & ~kpm[:, None, None, :]
    lse = torch.logsumexp(s.masked_fill(~visible, float("-inf")), -1)
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


CASES = [  # B, H, Lq, Lk, D, causal, mask, key padding, p, splits, split_keys
    (1, 1, 1, 1, 5, False, "none", False, 0.0, 1, 0),
    (2, 2, 37, 45, 24, False, "none", False, 0.0, 1, 0),
    (2, 2, 37, 45, 40, True, "bool", True, 0.0, 1, 0),
    (1, 3, 33, 70, 16, False, "float", False, 0.2, 1, 0),
    (2, 1, 40, 40, 8, True, "full_rows", False, 0.1, 1, 0),
    (2, 2, 45, 30, 33, True, "none", True, 0.3, 1, 0),  # Lq > Lk, causal rows past Lk
    (1, 2, 3, 200, 64, False, "float", True, 0.1, 4, 64),  # split-K decode
    (2, 1, 4, 150, 16, True, "bool", False, 0.0, 5, 32),  # split-K, causal: later splits see nothing
    (1, 1, 2, 300, 40, False, "none", False, 0.0, 3, 128),
]


def make_problem(B, H, Lq, Lk, D, mask, kp):
    g = torch.Generator().manual_seed(B * 1000 + Lq * 10 + Lk + D)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for L in (Lq, Lk, Lk))
    grad = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
    attn_mask = kpm = None
    if mask == "bool":
        attn_mask = torch.rand(1, H, Lq, Lk, generator=g) < 0.7
        attn_mask[..., 0] = True
    elif mask == "float":
        attn_mask = torch.randn(B, 1, Lq, Lk, generator=g, dtype=torch.float64)
        attn_mask[..., 1:][torch.rand(B, 1, Lq, Lk - 1, generator=g) < 0.2] = float("-inf")
    elif mask == "full_rows":
        attn_mask = torch.rand(Lq, Lk, generator=g) < 0.5
        attn_mask[::3] = False
    if kp:
        kpm = torch.rand(B, Lk, generator=g) < 0.3
        kpm[:, 0] = False
    return q, k, v, grad, attn_mask, kpm


def reference_results(q, k, v, grad, attn_mask, kpm, p, causal, scale, seed):
    B, H, Lq, _ = q.shape
    keep = AF.dropout_mask(torch.empty(B, H, Lq, k.shape[2], dtype=torch.bool), p, seed) if p > 0 else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference.scaled_dot_product_attention(*leaves, attn_mask, kpm, p, causal, scale, keep)
    ref.backward(grad)
    return ref.detach(), reference_lse(q, k, attn_mask, kpm, causal, scale), [t.grad for t in leaves]


@pytest.mark.parametrize("B,H,Lq,Lk,D,causal,mask,kp,p,splits,split_keys", CASES)
def test_simt_kernels_match_reference(emulator, tmp_path, B, H, Lq, Lk, D, causal, mask, kp, p, splits, split_keys):
    q, k, v, grad, attn_mask, kpm = make_problem(B, H, Lq, Lk, D, mask, kp)
    scale = 1.0 / D**0.5
    seed = torch.tensor([987654321], dtype=torch.int64)
    out, lse, gq, gk, gv = run_emulated(emulator, tmp_path, q, k, v, grad, attn_mask, kpm, p, causal, scale, seed,
                                        splits, split_keys)
    ref, ref_lse, ref_grads = reference_results(q, k, v, grad, attn_mask, kpm, p, causal, scale, seed)
    # The CPU op agrees too (same seed, same mask): the kernels implement the op's semantics.
    cpu = AF.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, key_padding_mask=kpm, dropout_p=p,
                                          is_causal=causal, scale=scale, seed=seed)
    tol = 1e-10
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)
    torch.testing.assert_close(out, cpu, rtol=0, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=tol)
    for name, ours, r in zip(("grad_q", "grad_k", "grad_v"), (gq, gk, gv), ref_grads):
        torch.testing.assert_close(ours, r, rtol=0, atol=tol, msg=lambda m: f"{name}: {m}")


MMA_CASES = [  # B, H, Lq, Lk, D, causal, mask, key padding, p, dtype
    (1, 2, 70, 90, 32, False, "none", False, 0.0, torch.float16),
    (2, 1, 70, 90, 64, True, "bool", True, 0.0, torch.bfloat16),
    (1, 2, 65, 130, 64, False, "float", False, 0.2, torch.float16),
    (1, 1, 130, 61, 128, True, "full_rows", False, 0.1, torch.bfloat16),
    (1, 1, 5, 33, 32, True, "none", True, 0.3, torch.float16),
    (2, 1, 1, 70, 64, False, "none", True, 0.0, torch.bfloat16),  # one row (the backward of a decode step)
    (1, 1, 140, 140, 128, True, "none", False, 0.0, torch.float16),  # several blocks both ways, causal
]


@pytest.mark.parametrize("B,H,Lq,Lk,D,causal,mask,kp,p,dtype", MMA_CASES)
def test_tensor_core_kernels_match_reference(emulator, tmp_path, B, H, Lq, Lk, D, causal, mask, kp, p, dtype):
    q, k, v, grad, attn_mask, kpm = make_problem(B, H, Lq, Lk, D, mask, kp)
    q, k, v, grad = (t.to(dtype).double() for t in (q, k, v, grad))  # what the kernels see
    scale = 1.0 / D**0.5
    seed = torch.tensor([13579], dtype=torch.int64)
    mode = "mma-f16" if dtype == torch.float16 else "mma-bf16"
    out, lse, gq, gk, gv = run_emulated(emulator, tmp_path, q, k, v, grad, attn_mask, kpm, p, causal, scale, seed,
                                        mode=mode)
    ref, ref_lse, ref_grads = reference_results(q, k, v, grad, attn_mask, kpm, p, causal, scale, seed)
    # P, dS and the outputs are rounded to the dtype: errors of a few of its ulps of the values.
    eps = torch.finfo(dtype).eps
    for name, ours, r in zip(("out", "grad_q", "grad_k", "grad_v"), (out, gq, gk, gv), (ref, *ref_grads)):
        bound = 8 * eps * max(1.0, r.abs().max().item())
        err = (ours - r).abs().max().item()
        assert err <= bound, f"{name} {dtype}: max error {err:.3g} > {bound:.3g}"
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-4)
    if mask == "full_rows":
        assert torch.equal(out[:, :, ::3], torch.zeros_like(out[:, :, ::3]))


@pytest.mark.parametrize("mode", ["simt", "mma-f16", "mma-bf16"])
def test_nan_rules(emulator, tmp_path, mode):
    """A NaN score makes its row NaN (as the CPU op), also when every other key is masked; other rows
    are untouched; fully masked rows are zeros with lse = +inf."""
    B, H, Lq, Lk, D = 1, 1, 6, 40, 8 if mode == "simt" else 32
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for L in (Lq, Lk, Lk))
    k[0, 0, 3, 2] = float("nan")  # key 3: NaN scores for every row that sees it
    mask = torch.ones(Lq, Lk, dtype=torch.bool)
    mask[1] = False
    mask[1, 3] = True  # row 1 sees only the NaN key
    mask[2] = False  # row 2 sees nothing
    mask[4, 3] = False  # row 4 does not see key 3
    mask[5, :] = False
    mask[5, 3] = mask[5, 9] = True
    out, lse, *_ = run_emulated(emulator, tmp_path, q, k, v, torch.zeros_like(q), mask, None, 0.0, False, 0.35,
                                torch.zeros(1, dtype=torch.int64), mode=mode)
    assert torch.isnan(out[0, 0, [0, 1, 3, 5]]).all()
    assert torch.equal(out[0, 0, 2], torch.zeros(D, dtype=torch.float64)) and lse[0, 0, 2] == float("inf")
    assert torch.isfinite(out[0, 0, 4]).all()
