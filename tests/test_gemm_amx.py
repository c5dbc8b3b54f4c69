"""The bf16 GEMM on Intel AMX tiles (linear / feed_forward, csrc/cpu/gemm/gemm_kernel.h): tile-edge
shapes, strided inputs, dropout numbering, thread-count independence and the backward, against the
float64 reference by the 2x rule and against the vdpbf16ps path. The mode switch itself is tested
everywhere; the rest skips where the CPU or the OS has no AMX."""

import pytest
import torch

import aiayn

from aiayn import functional as AF
from aiayn import reference
from conftest import AMX_SKIP_REASON, assert_2x_rule, bf16_mode, num_threads

needs_amx = pytest.mark.skipif(AMX_SKIP_REASON is not None, reason=AMX_SKIP_REASON or "")

AMX, DOT = 2, 1


def slack_for(ref):
    return 2**-9 * ref.abs().max().item() if ref.numel() else 1e-5


def test_mode_switch_and_build_info():
    info = aiayn.build_info()
    assert info["amx_bf16"] == aiayn._C.amx_supported()
    assert info["gemm_bf16"] in ("amx", "vdpbf16ps", "widened to float32")
    with pytest.raises(ValueError, match="-1, 0, 1 or 2"):
        aiayn._C.set_gemm_bf16(3)
    if not aiayn._C.amx_supported():
        with pytest.raises(ValueError, match="amx"):
            aiayn._C.set_gemm_bf16(AMX)
        assert info["gemm_bf16"] != "amx"
        return
    with bf16_mode(AMX):
        assert aiayn._C.gemm_bf16() == ("amx" if aiayn._C.cpu_isa() == "avx512" else "widened to float32")
        with aiayn.cpu_isa("avx2"):  # below AVX-512 bf16 is always widened
            assert aiayn._C.gemm_bf16() == "widened to float32"


@needs_amx
@pytest.mark.parametrize("tokens,k,n", [(1, 1, 1), (1, 7, 5), (2, 31, 33), (15, 32, 16), (16, 33, 31),
                                        (17, 64, 32), (31, 100, 47), (32, 96, 64), (33, 513, 65),
                                        (47, 1000, 129), (100, 2049, 40)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_forward_tile_edges(rng_seed, tokens, k, n, activation):
    """M, N, K around the tile sizes (16 rows, 32 columns, 32 k), M = 1, K odd, on the packed path
    (the forward's rows path would take few rows elsewhere)."""
    x = torch.randn(tokens, k).bfloat16()
    w = (torch.randn(n, k) / k**0.5).bfloat16()
    b = (0.5 * torch.randn(n)).bfloat16()
    ref = reference.linear(x.double(), w.double(), b.double(), activation)
    theirs = reference.linear(x, w, b, activation)
    out = torch.full((tokens, n), float("nan"), dtype=torch.bfloat16)
    with bf16_mode(AMX, rows_path=0):
        out.copy_(AF.linear(x, w, b, activation))
    assert_2x_rule(out, theirs, ref, f"amx linear {tokens}x{k}x{n} {activation}", seed=rng_seed, slack=slack_for(ref))
    with bf16_mode(DOT, rows_path=0):
        dot = AF.linear(x, w, b, activation)
    # Both sum the same bf16 products in float32, in other orders: one bf16 rounding apart at most.
    torch.testing.assert_close(out, dot, rtol=2**-7, atol=2**-7 * slack_for(ref) * 2**9)


@needs_amx
def test_strided_x_and_weight(rng_seed):
    tokens, k, n = 45, 77, 70
    wide_x = torch.randn(3, tokens, k + 9).bfloat16()
    wide_w = (torch.randn(n, k + 4) / k**0.5).bfloat16()
    x, w = wide_x[1, :, 3:3 + k], wide_w[:, 2:2 + k]
    xt = torch.randn(k, tokens).bfloat16().t()  # last dim strided: copied
    b = torch.randn(n).bfloat16()
    with bf16_mode(AMX, rows_path=0):
        out = AF.linear(x, w, b)
        out_t = AF.linear(xt, w, b)
        assert torch.equal(out, AF.linear(x.contiguous(), w.contiguous(), b))
        assert torch.equal(out_t, AF.linear(xt.contiguous(), w, b))
    ref = reference.linear(x.double(), w.double(), b.double())
    assert_2x_rule(out, reference.linear(x, w, b), ref, "amx strided", seed=rng_seed, slack=slack_for(ref))


def make_ffn(tokens, d_model, d_ff, requires_grad=False):
    x = torch.randn(tokens, d_model).bfloat16()
    w1 = (torch.randn(d_ff, d_model) / d_model**0.5).bfloat16()
    b1 = (0.5 * torch.randn(d_ff)).bfloat16()
    w2 = (torch.randn(d_model, d_ff) / d_ff**0.5).bfloat16()
    b2 = (0.5 * torch.randn(d_model)).bfloat16()
    return [t.requires_grad_(requires_grad) for t in (x, w1, b1, w2, b2)]


@needs_amx
@pytest.mark.parametrize("tokens,d_model,d_ff", [(1, 9, 17), (37, 24, 129), (37, 24, 128), (70, 65, 200)])
def test_feed_forward_dropout_mask_exact(tokens, d_model, d_ff):
    """The AMX epilogue numbers hidden element (t, j) as t * d_ff + j like every other path: the
    mask equals the reference's and the hidden activation is zero exactly where it drops."""
    x, w1, b1, w2, b2 = make_ffn(tokens, d_model, d_ff)
    seed = torch.tensor([987654321], dtype=torch.int64)
    with bf16_mode(AMX, rows_path=0):
        out, mask = AF.feed_forward(x, w1, b1, w2, b2, dropout_p=0.3, seed=seed, return_dropout_mask=True)
        _, hidden, _ = torch.ops.aiayn.feed_forward_fwd(x, w1, b1, w2, b2, 0.3, seed)
    assert torch.equal(mask, reference.dropout_mask((tokens, d_ff), 0.3, seed))
    h_ref = torch.relu(x.double() @ w1.double().t() + b1.double()) * mask / 0.7
    assert torch.equal(hidden == 0, h_ref == 0)
    torch.testing.assert_close(hidden.double(), h_ref, rtol=2**-7, atol=1e-2)
    with bf16_mode(DOT, rows_path=0):
        _, hidden_dot, _ = torch.ops.aiayn.feed_forward_fwd(x, w1, b1, w2, b2, 0.3, seed)
    assert torch.equal(hidden == 0, hidden_dot == 0)


@needs_amx
@pytest.mark.parametrize("backward", [False, True])
def test_one_and_two_threads_identical(backward):
    x, w1, b1, w2, b2 = make_ffn(300, 96, 352, requires_grad=backward)
    seed = torch.tensor([12345], dtype=torch.int64)
    grad = torch.randn(300, 96).bfloat16()
    results = []
    for threads in (1, 2):
        for t in (x, w1, b1, w2, b2):
            t.grad = None
        with num_threads(threads), bf16_mode(AMX, rows_path=0):
            out = AF.feed_forward(x, w1, b1, w2, b2, dropout_p=0.2, seed=seed)
            if backward:
                out.backward(grad)
        results.append([out.detach()] + ([t.grad for t in (x, w1, b1, w2, b2)] if backward else []))
    for one, two in zip(*results):
        assert torch.equal(one, two)


@needs_amx
@pytest.mark.parametrize("tokens,d_model,d_ff", [(1, 7, 9), (33, 40, 65), (130, 96, 257)])
def test_backward_matches_reference(rng_seed, tokens, d_model, d_ff):
    """dX, dW1, dW2 (and the biases) with every bf16 GEMM of the backward on AMX, 2x rule."""
    leaves = make_ffn(tokens, d_model, d_ff, requires_grad=True)
    grad = torch.randn(tokens, d_model).bfloat16()
    with bf16_mode(AMX, rows_path=0):
        AF.feed_forward(*leaves).backward(grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    reference.feed_forward(*ref_leaves).backward(grad.double())
    their_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    reference.feed_forward(*their_leaves).backward(grad)
    for name, ours, theirs, ref in zip(("x", "w1", "b1", "w2", "b2"), leaves, their_leaves, ref_leaves):
        assert_2x_rule(ours.grad, theirs.grad, ref.grad, f"amx grad {name} {tokens}x{d_model}x{d_ff}",
                       seed=rng_seed, slack=slack_for(ref.grad))


@needs_amx
def test_huge_weight_chunked_and_cached_packing(rng_seed):
    """The per-task chunked packing (weights over 16 MiB packed) and the packed-weight cache give
    the same bits as the plain packed path; switching modes never reuses the other layout."""
    x = torch.randn(20, 512).bfloat16()
    w = (torch.randn(17000, 512) / 512**0.5).bfloat16()
    with bf16_mode(AMX, rows_path=0):
        chunked = AF.linear(x, w)
        with aiayn.packed_weight_cache():
            cached = AF.linear(x, w)
            cached_again = AF.linear(x, w)
            with bf16_mode(DOT, rows_path=0):
                dot = AF.linear(x, w)
    assert torch.equal(chunked, cached) and torch.equal(cached, cached_again)
    ref = reference.linear(x.double(), w.double(), None)
    assert_2x_rule(chunked, reference.linear(x, w, None), ref, "amx chunked", seed=rng_seed, slack=slack_for(ref))
    assert_2x_rule(dot, reference.linear(x, w, None), ref, "dot after amx cache", seed=rng_seed, slack=slack_for(ref))


@needs_amx
def test_amx_peak_probe_and_bench_peaks(tmp_path, monkeypatch):
    # The benchmark's bf16 "% of peak" is of the instruction the kernels use: tdpbf16ps here.
    seconds, flops = aiayn._C.peak_bf16_amx(1000)
    assert seconds > 0 and flops == 4 * 2 * 16 * 16 * 32 * 1000 * torch.get_num_threads()
    from aiayn.bench import peak

    monkeypatch.setenv("AIAYN_CACHE_DIR", str(tmp_path))
    with bf16_mode(AMX):
        p = peak.peaks("cpu")
    assert p["machine"]["bf16"] == "amx"
    assert p["flops"]["bfloat16"] == p["flops"]["bfloat16_amx"] > p["flops"]["bfloat16_dot"] > 0
