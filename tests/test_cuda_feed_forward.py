"""CUDA linear and feed_forward (the paper's position-wise FFN, §3.3) on cuBLASLt with fused
epilogues (bias + ReLU writing the ReLU bit-mask, DRELU + bias gradient reading it, bias gradients)
and our Philox dropout pass folding the keep mask into the bit-mask: the CPU test matrices with the
2x rule, the same dropout mask and results as the CPU op for one seed, the bit-mask's layout against
cuBLASLt's own output, gradients, gradcheck, opcheck, torch.compile, and the fallbacks (the ReLU
epilogues switched off with aiayn._C.cuda_set_relu_epilogues(False), every GEMM with
AIAYN_CUBLASLT=0, misaligned operands). Needs a CUDA GPU; skipped elsewhere (the kernels still
compile there; tests/test_cuda_relu_mask.py checks the bit-mask handling on the host).

Accuracy rule ("2x rule"): our max error against the float64 reference is at most twice torch's
own in the same dtype (reference.* run by torch's kernels), plus a slack: half an ulp of the largest
reference value for 16-bit dtypes (the rounding of the hidden activation and of the result, which
nobody avoids), 1e-5 relative for float32."""

import warnings

import pytest
import torch

import aiayn
from aiayn import functional as AF
from aiayn import reference as R
from conftest import assert_2x_rule
from test_feed_forward import kink_free, make_params

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: CUDA kernels compiled but not run here"),
]

DEV = "cuda"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 off (torch's default) so float32 is compared with float32 on both sides; restored after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def seed_of(v):
    return torch.tensor([v], dtype=torch.int64)


def cuda(ts):
    return [None if t is None else t.to(DEV) for t in ts]


def dbl(t):
    return None if t is None else t.double()


def slack(dtype, ref, ulps=0.5):
    amax = ref.abs().max().item() if ref.numel() else 0.0
    if dtype in (torch.float16, torch.bfloat16):
        return ulps * torch.finfo(dtype).eps * amax + 1e-6
    return 1e-5 * max(1.0, amax)


def unpack_relu_mask(mask, d_ff):
    """The (..., d_ff) bool gate held by feed_forward's CUDA bit-mask (csrc/common/relu_mask.h):
    element (t, j) is bit j % 8 (least significant first) of byte j // 8 of token t's
    ceil(d_ff / 128) * 16 bytes -- cuBLASLt's column-major bit matrix with a leading dimension of
    d_ff rounded up to 128 bits, read from our row-major side."""
    assert mask.dtype == torch.uint8 and mask.shape[-1] == (d_ff + 127) // 128 * 16
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    bits = (mask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*mask.shape[:-1], -1)[..., :d_ff].bool()


@pytest.fixture
def relu_epilogues():
    """Call with False to send the ReLU-epilogue GEMMs to their fallback; restored after."""
    before = aiayn._C.cuda_set_relu_epilogues(True)
    yield aiayn._C.cuda_set_relu_epilogues
    aiayn._C.cuda_set_relu_epilogues(before)


def check_ffn_forward(x, params, p, what, seed):
    w1, b1, w2, b2 = params
    out, mask = AF.feed_forward(x, w1, b1, w2, b2, dropout_p=p, return_dropout_mask=True)
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    ref = R.feed_forward(x.double(), *map(dbl, params), p, mask)
    theirs = R.feed_forward(x, w1, b1, w2, b2, p, mask)
    assert_2x_rule(out, theirs, ref, what, seed=seed, slack=slack(x.dtype, ref))
    return out


def check_ffn_backward(x, params, p, what, seed):
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, *params)]
    out, mask = AF.feed_forward(*leaves, dropout_p=p, return_dropout_mask=True)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, *params)]
    R.feed_forward(*ref_leaves, p, mask).backward(grad.double())
    torch_leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, *params)]
    R.feed_forward(*torch_leaves, p, mask).backward(grad)
    for name, ours, r, t in zip(("x", "w1", "b1", "w2", "b2"), leaves, ref_leaves, torch_leaves):
        if ours is None:
            continue
        assert ours.grad.dtype == ours.dtype and ours.grad.shape == ours.shape
        # Gradients of 16-bit weights are sums over tokens rounded once: one ulp of the largest.
        assert_2x_rule(ours.grad, t.grad, r.grad, f"grad {name} {what}", seed=seed,
                       slack=slack(x.dtype, r.grad, ulps=1.0))


# --- feed_forward: the CPU matrix on CUDA ---------------------------------------------------------

SMALL = [(1, 8, 32), (3, 64, 32), (17, 8, 2048), (3, 1000, 32), (17, 64, 4100), (1, 1000, 2048)]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("tokens,d_model,d_ff", SMALL)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_ffn_forward_small(rng_seed, dtype_name, tokens, d_model, d_ff, p):
    dtype = DTYPES[dtype_name]
    x = torch.randn(tokens, d_model).to(DEV, dtype)
    check_ffn_forward(x, cuda(make_params(d_model, d_ff, dtype)), p,
                      f"fwd {dtype_name} {tokens}x{d_model}x{d_ff} p={p}", rng_seed)


@pytest.mark.parametrize("dtype_name,tokens,d_model,d_ff", [
    ("fp32", 512, 512, 2048), ("fp32", 3072, 512, 2048), ("fp32", 512, 1000, 4100), ("fp32", 3072, 64, 32),
    ("fp32", 17, 512, 4100), ("bf16", 512, 512, 2048), ("fp16", 3072, 512, 2048), ("bf16", 4096, 1024, 4096)])
def test_ffn_forward_big(rng_seed, dtype_name, tokens, d_model, d_ff):
    dtype = DTYPES[dtype_name]
    x = torch.randn(tokens, d_model).to(DEV, dtype)
    check_ffn_forward(x, cuda(make_params(d_model, d_ff, dtype)), 0.1, f"fwd {dtype_name} {tokens}x{d_model}x{d_ff}",
                      rng_seed)


@pytest.mark.parametrize("dtype_name", list(DTYPES) + ["fp64"])
@pytest.mark.parametrize("tokens,d_model,d_ff", [(1, 8, 32), (17, 64, 100), (40, 33, 2048), (512, 512, 2048)])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
def test_ffn_backward(rng_seed, dtype_name, tokens, d_model, d_ff, p, bias):
    dtype = DTYPES.get(dtype_name, torch.float64)
    x, (w1, b1, w2, b2) = kink_free(tokens, d_model, d_ff, dtype)
    params = (w1, b1, w2, b2) if bias else (w1, None, w2, None)
    check_ffn_backward(x.to(DEV), cuda(params), p, f"{dtype_name} {tokens}x{d_model}x{d_ff} p={p} bias={bias}",
                       rng_seed)


def test_ffn_strided_and_batched_inputs(rng_seed):
    for dtype in DTYPES.values():
        w1, b1, w2, b2 = params = cuda(make_params(24, 50, dtype))
        check_ffn_forward(torch.randn(3, 5, 24).to(DEV, dtype), params, 0.2, f"3-d {dtype}", rng_seed)
        wide = torch.randn(11, 30).to(DEV, dtype)[:, 3:27]  # row stride 30, offset 3: misaligned rows
        check_ffn_forward(wide, params, 0.2, f"column slice {dtype}", rng_seed)
        xt = torch.randn(4, 6, 24).to(DEV, dtype).transpose(0, 1)  # leading dims do not collapse
        check_ffn_forward(xt, params, 0.0, f"transposed leading dims {dtype}", rng_seed)
        xs = torch.randn(24, 9).to(DEV, dtype).t()  # last dim strided: copied
        check_ffn_forward(xs, params, 0.0, f"last dim strided {dtype}", rng_seed)
        w1t = w1.t().contiguous().t()
        torch.testing.assert_close(AF.feed_forward(xs, w1t, b1, w2, b2), AF.feed_forward(xs, w1, b1, w2, b2))
        xg = wide.clone().requires_grad_()
        AF.feed_forward(xg, w1, b1, w2, b2, dropout_p=0.1).float().sum().backward()
        assert xg.grad.shape == xg.shape and torch.isfinite(xg.grad).all()


# --- dropout: the CPU op's mask, bit for bit ---------------------------------------------------------


@pytest.mark.parametrize("tokens,d_model,d_ff", [(37, 24, 129), (5, 16, 4100), (64, 512, 2048)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_ffn_same_mask_and_results_as_cpu(tokens, d_model, d_ff, p):
    # Exact pre-activations (kink_free), so both devices take the same side of every ReLU: the zero
    # pattern of the hidden activation is then exactly ReLU x the Philox mask, on both devices.
    x, params = kink_free(tokens, d_model, d_ff, torch.float32)
    seed = seed_of(987654321 + d_ff)
    out_cpu, h_cpu, _ = torch.ops.aiayn.feed_forward_fwd(x, *params, p, seed)
    out_cuda, h_cuda, m_cuda = torch.ops.aiayn.feed_forward_fwd(x.to(DEV), *cuda(params), p, seed)
    mask = R.dropout_mask((tokens, d_ff), p, seed)
    pre = x.double() @ params[0].double().t() + params[1].double()
    h_ref = torch.relu(pre) * mask / (1 - p)
    assert torch.equal(h_cuda.cpu() == 0, h_ref == 0), "CUDA hidden zeros are not ReLU x the Philox mask"
    assert torch.equal(h_cuda.cpu() == 0, h_cpu == 0)
    assert torch.equal(unpack_relu_mask(m_cuda, d_ff).cpu(), h_ref > 0), "bit-mask is not ReLU x the Philox mask"
    torch.testing.assert_close(h_cuda.cpu(), h_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_cuda.cpu(), out_cpu, rtol=1e-5, atol=1e-5)
    # The backward on both devices.
    dy = torch.randn(tokens, d_model)
    g_cpu = torch.ops.aiayn.feed_forward_bwd(dy, x, params[0], params[2], h_cpu, p)
    args = (dy.to(DEV), x.to(DEV), params[0].to(DEV), params[2].to(DEV), h_cuda, p)
    for relu_mask in (m_cuda, None):  # the DRELU epilogue's gate, and the gate read off hidden
        g_cuda = torch.ops.aiayn.feed_forward_bwd(*args, relu_mask)
        for name, a, b in zip(("dx", "dw1", "db1", "dw2", "db2"), g_cpu, g_cuda):
            tol = 1e-5 * max(1.0, a.abs().max().item())
            torch.testing.assert_close(b.cpu(), a, rtol=0, atol=tol, msg=lambda m: f"{name}: {m}")


def test_ffn_dropout_reproducible_and_p_one(rng_seed):
    x = torch.randn(9, 16, device=DEV)
    w1, b1, w2, b2 = cuda(make_params(16, 40, torch.float32))
    torch.manual_seed(0)
    a = AF.feed_forward(x, w1, b1, w2, b2, dropout_p=0.5)
    torch.manual_seed(0)
    b = AF.feed_forward(x, w1, b1, w2, b2, dropout_p=0.5)
    assert torch.equal(a, b)
    torch.testing.assert_close(AF.feed_forward(x, w1, b1, w2, b2, dropout_p=1.0), b2.expand(9, 16))
    torch.testing.assert_close(AF.feed_forward(x, w1, b1, w2, b2, dropout_p=0.7, training=False),
                               R.feed_forward(x, w1, b1, w2, b2), rtol=1e-5, atol=1e-5)


# --- linear ----------------------------------------------------------------------------------------


def make_linear(tokens, k, n, dtype, bias=True):
    x = torch.randn(tokens, k).to(DEV, dtype)
    w = (torch.randn(n, k) / max(k, 1) ** 0.5).to(DEV, dtype)
    b = (0.5 * torch.randn(n)).to(DEV, dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("tokens,k,n", [(1, 8, 32), (3, 1000, 17), (17, 64, 4100), (13, 3, 5), (40, 512, 64),
                                        (3072, 512, 2048)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_linear_forward(rng_seed, dtype_name, tokens, k, n, activation):
    dtype = DTYPES[dtype_name]
    x, w, b = make_linear(tokens, k, n, dtype)
    out = AF.linear(x, w, b, activation)
    assert out.shape == (tokens, n) and out.dtype == dtype
    ref = R.linear(x.double(), w.double(), b.double(), activation)
    assert_2x_rule(out, R.linear(x, w, b, activation), ref, f"linear {dtype_name} {tokens}x{k}x{n} {activation}",
                   seed=rng_seed, slack=slack(dtype, ref))


@pytest.mark.parametrize("dtype_name", list(DTYPES) + ["fp64"])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens,k,n", [(18, 37, 50), (256, 512, 1024)])
def test_linear_backward(rng_seed, dtype_name, activation, bias, tokens, k, n):
    dtype = DTYPES.get(dtype_name, torch.float64)
    x, (w, b, _, _) = kink_free(tokens, k, n, dtype)  # exact pre-activations: no ReLU kink flips
    x, w, b = x.to(DEV).reshape(2, tokens // 2, k), w.to(DEV), b.to(DEV) if bias else None
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, w, b)]
    out = AF.linear(*leaves, activation)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, b)]
    R.linear(*ref_leaves, activation).backward(grad.double())
    torch_leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b)]
    R.linear(*torch_leaves, activation).backward(grad)
    for name, ours, r, t in zip(("x", "w", "b"), leaves, ref_leaves, torch_leaves):
        if ours is not None:
            assert_2x_rule(ours.grad, t.grad, r.grad, f"grad {name} {dtype_name} {activation}", seed=rng_seed,
                           slack=slack(dtype, r.grad, ulps=1.0))


def test_linear_strided_and_nn_linear():
    lin = torch.nn.Linear(24, 40).to(DEV)
    x = torch.randn(10, 31, device=DEV)[:, 5:29]
    torch.testing.assert_close(AF.linear(x, lin.weight, lin.bias), lin(x), rtol=1e-5, atol=1e-5)
    xt = torch.randn(3, 4, 24, device=DEV).transpose(0, 1)
    torch.testing.assert_close(AF.linear(xt, lin.weight, lin.bias, "relu"), torch.relu(lin(xt)), rtol=1e-5, atol=1e-5)
    xs = torch.randn(24, 6, device=DEV).t()
    torch.testing.assert_close(AF.linear(xs, lin.weight.t().contiguous().t(), lin.bias), lin(xs), rtol=1e-5, atol=1e-5)
    xe = torch.randn(1, 24, device=DEV).expand(5, 24)  # stride-0 rows: copied for cuBLASLt
    torch.testing.assert_close(AF.linear(xe, lin.weight, lin.bias), lin(xe), rtol=1e-5, atol=1e-5)


# --- cuBLASLt and its fallback ---------------------------------------------------------------------


def ffn_fwd_bwd(x, params, p, seed):
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, *params)]
    out = AF.feed_forward(*leaves, dropout_p=p, seed=seed)
    out.backward(torch.ones_like(out))
    return [out.detach()] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_fused_path_is_taken_and_fallback_agrees(monkeypatch, dtype_name):
    """Aligned 16-bit shapes run on cuBLASLt (no fallback counted); AIAYN_CUBLASLT=0 sends every
    GEMM to torch's matmul (2 forward + 4 backward counted) with the same results up to rounding."""
    dtype = DTYPES[dtype_name]
    x, params = kink_free(64, 512, 2048, dtype)
    x, params, seed = x.to(DEV), cuda(params), seed_of(5)
    before = aiayn._C.cuda_gemm_fallbacks()
    fused = ffn_fwd_bwd(x, params, 0.1, seed)
    if dtype != torch.float32:  # float32 (no TF32) bias-gradient epilogues may be missing: not asserted
        assert aiayn._C.cuda_gemm_fallbacks() == before, "cuBLASLt turned down an aligned 16-bit FFN GEMM"
    monkeypatch.setenv("AIAYN_CUBLASLT", "0")
    before = aiayn._C.cuda_gemm_fallbacks()
    plain = ffn_fwd_bwd(x, params, 0.1, seed)
    assert aiayn._C.cuda_gemm_fallbacks() == before + 6
    for name, a, b in zip(("out", "x", "w1", "b1", "w2", "b2"), fused, plain):
        # The fallback rounds dh twice (mm, then * 1 / (1 - p)): a few ulps apart at most.
        tol = 4 * torch.finfo(dtype).eps * max(1.0, b.abs().max().item()) if dtype != torch.float32 else 1e-4
        torch.testing.assert_close(a, b, rtol=0, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("fused", [True, False])
def test_relu_mask_is_relu_and_dropout(relu_epilogues, dtype_name, p, fused):
    """The bit-mask the forward returns is [pre-activation > 0] & keep bit for bit, both as cuBLASLt's
    RELU_AUX_BIAS writes it (the layout of common/relu_mask.h is cuBLASLt's: this is the check on a
    real cuBLASLt) with our dropout pass ANDing the CPU's Philox mask in, and as the fallback writes it."""
    dtype = DTYPES[dtype_name]
    relu_epilogues(fused)
    for tokens, d_model, d_ff in [(64, 512, 2048), (33, 40, 72), (5, 24, 200)]:
        x, params = kink_free(tokens, d_model, d_ff, dtype)
        seed = seed_of(77 + d_ff)
        before = aiayn._C.cuda_gemm_fallbacks()
        out, hidden, mask = torch.ops.aiayn.feed_forward_fwd(x.to(DEV), *cuda(params), p, seed)
        if fused and dtype != torch.float32 and d_ff % 8 == 0 and d_model % 8 == 0:
            assert aiayn._C.cuda_gemm_fallbacks() == before, "cuBLASLt turned down an aligned RELU_AUX_BIAS GEMM"
        pre = x.double() @ params[0].double().t() + params[1].double()  # exact (kink_free), never 0
        keep = R.dropout_mask((tokens, d_ff), p, seed) if p > 0 else torch.ones(tokens, d_ff, dtype=torch.bool)
        assert mask.shape == (tokens, (d_ff + 127) // 128 * 16) and mask.device.type == "cuda"
        assert torch.equal(unpack_relu_mask(mask, d_ff).cpu(), (pre > 0) & keep), f"{dtype} {d_ff} fused={fused}"
        assert torch.equal(hidden.cpu() > 0, (pre > 0) & keep)


def test_relu_mask_layout_probe_agrees_with_cublaslt(relu_epilogues):
    """The run-time probe (relu_mask_layout_ok in cuda/cublaslt_gemm.cu) finds cuBLASLt's bit-mask
    laid out as common/relu_mask.h assumes: no warning, and the fused RELU_AUX path runs."""
    relu_epilogues(True)
    x, params = kink_free(16, 64, 256, torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = aiayn._C.cuda_gemm_fallbacks()
        torch.ops.aiayn.feed_forward_fwd(x.to(DEV), *cuda(params), 0.2, seed_of(3))
        torch.cuda.synchronize()
    assert not [w for w in caught if "bit-mask" in str(w.message)]
    assert aiayn._C.cuda_gemm_fallbacks() == before


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_relu_epilogues_match_their_fallback(relu_epilogues, dtype_name, p):
    """RELU_AUX_BIAS + DRELU_BGRAD (fused) against the same FFN with those GEMMs on the fallback
    (torch's matmul + our passes): forward, every gradient, and the linear(relu) forward. The fused
    path takes no fallback for aligned 16-bit shapes; the forced one takes 2 per forward + backward
    (GEMM1 and the backward's dh GEMM)."""
    dtype = DTYPES[dtype_name]
    x, params = kink_free(64, 256, 1024, dtype)
    x, params, seed = x.to(DEV), cuda(params), seed_of(9)
    before = aiayn._C.cuda_gemm_fallbacks()
    fused = ffn_fwd_bwd(x, params, p, seed)
    lin_fused = AF.linear(x, params[0], params[1], "relu")
    if dtype != torch.float32:
        assert aiayn._C.cuda_gemm_fallbacks() == before, "cuBLASLt turned down an aligned fused-ReLU GEMM"
    relu_epilogues(False)
    before = aiayn._C.cuda_gemm_fallbacks()
    plain = ffn_fwd_bwd(x, params, p, seed)
    assert aiayn._C.cuda_gemm_fallbacks() - before >= 2
    lin_plain = AF.linear(x, params[0], params[1], "relu")
    for name, a, b in zip(("out", "x", "w1", "b1", "w2", "b2", "linear"), fused + [lin_fused], plain + [lin_plain]):
        tol = 4 * torch.finfo(dtype).eps * max(1.0, b.abs().max().item()) if dtype != torch.float32 else 1e-4
        torch.testing.assert_close(a, b, rtol=0, atol=tol, msg=lambda m: f"{name}: {m}")


def test_relu_epilogue_unaligned_shapes_fall_back_correctly(relu_epilogues, rng_seed):
    """Shapes and views cuBLASLt's fused epilogues may decline (odd d_ff: 2-byte aligned rows and a
    bias of odd length in 16-bit types; a misaligned x view): whichever path runs, the output, the
    gradients and the bit-mask are right."""
    for dtype in DTYPES.values():
        for tokens, d_model, d_ff in [(7, 13, 37), (9, 24, 129), (1, 8, 1)]:
            x, params = kink_free(tokens, d_model, d_ff, dtype)
            check_ffn_backward(x.to(DEV), cuda(params), 0.3, f"unaligned {dtype} {d_ff}", rng_seed)
            _, _, mask = torch.ops.aiayn.feed_forward_fwd(x.to(DEV), *cuda(params), 0.0, seed_of(0))
            pre = x.double() @ params[0].double().t() + params[1].double()
            assert torch.equal(unpack_relu_mask(mask, d_ff).cpu(), pre > 0)
        x, params = kink_free(33, 40, 72, dtype)
        xo = torch.cat([torch.zeros(33, 1, dtype=dtype), x], 1).to(DEV)[:, 1:]  # 2/4-byte aligned rows
        check_ffn_forward(xo, cuda(params), 0.3, f"misaligned view {dtype}", rng_seed)


@pytest.mark.parametrize("fused", [True, False])
def test_relu_gate_at_exactly_zero(relu_epilogues, fused):
    """A pre-activation of exactly 0 is inactive: zero gradient through it, as torch.relu's backward
    and the CPU op give (the bit-mask is [pre > 0]; cuBLASLt's RELU_AUX bits mark where the ReLU's
    input is positive)."""
    relu_epilogues(fused)
    x, (w1, b1, w2, b2) = kink_free(6, 16, 128, torch.float32)
    x[2] = 0.0
    b1[::3] = 0.0  # token 2's pre-activations are exactly 0 for every third unit
    dy = torch.randn(6, 16)
    out_cpu, h_cpu, _ = torch.ops.aiayn.feed_forward_fwd(x, w1, b1, w2, b2, 0.0, seed_of(0))
    g_cpu = torch.ops.aiayn.feed_forward_bwd(dy, x, w1, w2, h_cpu, 0.0)
    d = cuda((dy, x, w1, b1, w2, b2))
    out, hidden, mask = torch.ops.aiayn.feed_forward_fwd(d[1], *d[2:], 0.0, seed_of(0))
    assert not unpack_relu_mask(mask, 128)[2, ::3].any(), "cuBLASLt marks ReLU(0) as active"
    g = torch.ops.aiayn.feed_forward_bwd(d[0], d[1], d[2], d[4], hidden, 0.0, mask)
    for name, a, b in zip(("dx", "dw1", "db1", "dw2", "db2"), g_cpu, g):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("forced", [False, True])
def test_fallback_matches_reference(monkeypatch, rng_seed, forced):
    if forced:
        monkeypatch.setenv("AIAYN_CUBLASLT", "0")
    for dtype in DTYPES.values():
        x, params = kink_free(33, 40, 72, dtype)
        check_ffn_backward(x.to(DEV), cuda(params), 0.3, f"fallback={forced} {dtype}", rng_seed)
        # Odd element offsets and row strides (2-byte aligned rows in 16-bit types): cuBLASLt gets
        # the true alignment and either copes or declines; the result is right either way.
        xo = torch.randn(33, 45).to(DEV, dtype)[:, 1:41]
        check_ffn_forward(xo, cuda(params), 0.3, f"misaligned fallback={forced} {dtype}", rng_seed)
        xl, w, b = make_linear(9, 13, 7, dtype)
        ref = R.linear(xl.double(), w.double(), b.double(), "relu")
        assert_2x_rule(AF.linear(xl, w, b, "relu"), R.linear(xl, w, b, "relu"), ref, f"odd linear {dtype}",
                       seed=rng_seed, slack=slack(dtype, ref))


def test_tf32_follows_torch_flag():
    x, w, b = make_linear(256, 1024, 256, torch.float32)
    ref = R.linear(x.double(), w.double(), b.double())
    exact = (AF.linear(x, w, b).double() - ref).abs().max().item()
    torch.backends.cuda.matmul.allow_tf32 = True
    tf32 = (AF.linear(x, w, b).double() - ref).abs().max().item()
    assert exact < 1e-4, "float32 without TF32 must be float32-accurate"
    assert tf32 < 5e-2  # TF32 (10-bit mantissa) is allowed to be coarser, never wrong
    assert tf32 > 10 * exact, "allow_tf32=True should run TF32 tensor cores (coarser than float32)"


# --- edge cases, errors, PyTorch citizenship --------------------------------------------------------


def test_empty_degenerate_and_nan():
    w1, b1, w2, b2 = cuda(make_params(8, 16, torch.float32))
    assert AF.feed_forward(torch.empty(0, 8, device=DEV), w1, b1, w2, b2, dropout_p=0.1).shape == (0, 8)
    x = torch.empty(0, 8, device=DEV, requires_grad=True)
    w1g = w1.clone().requires_grad_()
    AF.feed_forward(x, w1g, b1, w2, b2).sum().backward()
    assert x.grad.shape == (0, 8) and torch.equal(w1g.grad, torch.zeros_like(w1))
    x = torch.randn(3, 8, device=DEV)
    e = lambda *s: torch.empty(*s, device=DEV)  # noqa: E731
    torch.testing.assert_close(AF.feed_forward(x, e(0, 8), e(0), e(8, 0), b2), b2.expand(3, 8))
    assert AF.feed_forward(e(3, 0), e(5, 0), torch.randn(5, device=DEV), e(0, 5), e(0)).shape == (3, 0)
    torch.testing.assert_close(AF.linear(e(3, 0), e(5, 0), b2[:5], "relu"), torch.relu(b2[:5]).expand(3, 5))
    assert AF.linear(e(0, 4), torch.randn(5, 4, device=DEV)).shape == (0, 5)
    x[1, 2] = float("nan")
    out = AF.feed_forward(x, w1, b1, w2, b2)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any() and not torch.isnan(out[2]).any()


def test_errors_name_the_argument():
    x = torch.randn(4, 16, device=DEV)
    w1, b1, w2, b2 = cuda(make_params(16, 32, torch.float32))
    with pytest.raises(ValueError, match="'w2'"):
        AF.feed_forward(x, w1, b1, w2.cpu(), b2)
    with pytest.raises(ValueError, match="'b'"):
        AF.linear(x, w1, b1.cpu())
    with pytest.raises(TypeError, match="'w1'.*dtype"):
        AF.feed_forward(x, w1.half(), b1, w2, b2)
    with pytest.raises(TypeError, match="'x'.*dtype"):
        AF.linear(x.int(), w1.int())
    with pytest.raises(ValueError, match="'w1'.*shape"):
        AF.feed_forward(x, w1[:, :8], b1, w2, b2)
    with pytest.raises(RuntimeError, match="'seed'"):
        AF.feed_forward(x, w1, b1, w2, b2, dropout_p=0.1, seed=seed_of(1).to(DEV))
    _, hidden, _ = torch.ops.aiayn.feed_forward_fwd(x, w1, b1, w2, b2, 0.0, seed_of(0))
    with pytest.raises(ValueError, match="'hidden'"):
        torch.ops.aiayn.feed_forward_bwd(x, x, w1, w2, hidden[:, :3], 0.0)
    with pytest.raises(ValueError, match="'out'"):
        torch.ops.aiayn.linear_bwd(hidden, x, w1, None, True)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_opcheck(dtype_name, p):
    dtype = DTYPES[dtype_name]
    x = torch.randn(5, 24).to(DEV, dtype).requires_grad_()
    w1, b1, w2, b2 = (t.requires_grad_() for t in cuda(make_params(24, 40, dtype)))
    seed = seed_of(3)
    torch.library.opcheck(torch.ops.aiayn.feed_forward_fwd.default, (x, w1, b1, w2, b2, p, seed))
    torch.library.opcheck(torch.ops.aiayn.feed_forward_fwd.default, (x, w1, None, w2, None, p, seed))
    d = [t.detach() for t in (x, w1, b1, w2, b2)]
    _, hidden, _ = torch.ops.aiayn.feed_forward_fwd(*d, p, seed)
    torch.library.opcheck(torch.ops.aiayn.feed_forward_bwd.default,
                          (torch.randn_like(d[0]), d[0], d[1], d[3], hidden, p))
    _, hidden, mask = torch.ops.aiayn.feed_forward_fwd(*d, p, seed)
    torch.library.opcheck(torch.ops.aiayn.feed_forward_bwd.default,
                          (torch.randn_like(d[0]), d[0], d[1], d[3], hidden, p, mask))
    for relu in (False, True):
        torch.library.opcheck(torch.ops.aiayn.linear_fwd.default, (x, w1, b1, relu))
    out = torch.ops.aiayn.linear_fwd(d[0], d[1], d[2], True)
    torch.library.opcheck(torch.ops.aiayn.linear_bwd.default, (torch.randn_like(out), d[0], d[1], out, True))


def test_gradcheck_float64():
    x = torch.randn(2, 3, 6, dtype=torch.float64, device=DEV, requires_grad=True)
    w1, b1, w2, b2 = (t.requires_grad_() for t in cuda(make_params(6, 9, torch.float64)))
    seed = seed_of(42)
    for p in (0.0, 0.4):
        fn = lambda x, w1, b1, w2, b2: AF.feed_forward(x, w1, b1, w2, b2, dropout_p=p, seed=seed)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w1, b1, w2, b2))
    for act in (None, "relu"):
        assert torch.autograd.gradcheck(lambda x, w, b: AF.linear(x, w, b, act), (x, w1, b1))


def test_torch_compile_fullgraph():
    x = torch.randn(8, 16, device=DEV)
    w1, b1, w2, b2 = cuda(make_params(16, 32, torch.float32))
    seed = seed_of(11)

    def f(x, w1, b1, w2, b2):
        return AF.feed_forward(x * 2, w1, b1, w2, b2, dropout_p=0.25, seed=seed).relu()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w1, b1, w2, b2), f(x, w1, b1, w2, b2))


def test_sanitizer_smoke(relu_epilogues):
    """A few small calls over every path (fused and fallback GEMMs, the ReLU epilogues on and off,
    vectorised and scalar element passes, bit-mask writer, dropout fold and gate, dropout on and
    off, float16 to float64): what scripts/cuda_check.sh runs under compute-sanitizer."""
    for fused in (True, False):
        relu_epilogues(fused)
        for dtype, tokens, d_model, d_ff, p in [(torch.float32, 7, 16, 40, 0.1), (torch.float16, 5, 24, 33, 0.5),
                                                (torch.bfloat16, 3, 64, 128, 0.0), (torch.float64, 4, 6, 10, 0.2)]:
            x, params = kink_free(tokens, d_model, d_ff, dtype)
            check_ffn_backward(x.to(DEV), cuda(params), p, f"smoke {dtype} fused={fused}", None)
            xl, w, b = make_linear(tokens, d_model, d_ff, dtype)
            AF.linear(xl.requires_grad_(), w, b, "relu").sum().backward()
    torch.cuda.synchronize()
