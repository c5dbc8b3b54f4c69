"""scaled_dot_product_attention on CUDA (paper §3.2.1): the CPU attention test matrix
(tests/test_attention.py) on the GPU kernels — tensor-core flash kernels (float16 / bfloat16, head
dims 32 / 64 / 128), the SIMT kernels (float32, float64, other head dims) and the split-K decode
step — against the float64 reference with the 2x rule; the same outputs and gradients as the CPU
op for the same inputs and seed (dropout included); opcheck, gradcheck and torch.compile. Needs a
CUDA GPU; skipped elsewhere (the kernels still compile there)."""

import math

import pytest
import torch
import torch.nn.functional as F

import aiayn  # noqa: F401  (registers the ops)
from aiayn import functional as AF
from aiayn import reference
from conftest import assert_2x_rule

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA device: CUDA attention kernels compiled but not run on a GPU"),
]

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF = (torch.float16, torch.bfloat16)


def rand(*shape, dtype=torch.float32, scale=1.0, device=DEV):
    return (torch.randn(*shape) * scale).to(device=device, dtype=dtype)


def make_mask(kind, B, H, Lq, Lk, dtype):
    """(attn_mask, key_padding_mask) on the GPU, as tests/test_attention.py's make_mask."""
    attn_mask = kpm = None
    if kind == "key_padding":
        kpm = torch.rand(B, Lk) < 0.3
        kpm[:, 0] = False
    elif kind == "bool":
        attn_mask = torch.rand(1, H, Lq, Lk) < 0.7
        attn_mask[..., 0] = True
    elif kind == "float":
        attn_mask = torch.randn(B, 1, Lq, Lk)
        attn_mask[..., 1:][torch.rand(B, 1, Lq, Lk - 1) < 0.2] = float("-inf")
        attn_mask = attn_mask.to(dtype)
    elif kind == "full_rows":
        attn_mask = torch.rand(Lq, Lk) < 0.5
        attn_mask[::3] = False  # every third query sees nothing
    elif kind != "none":
        raise ValueError(kind)
    return (None if attn_mask is None else attn_mask.to(DEV)), (None if kpm is None else kpm.to(DEV))


def _torch_mask(attn_mask, kpm):
    if kpm is None:
        return attn_mask
    keep = ~kpm[:, None, None, :]
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.masked_fill(~keep, float("-inf"))


def _am64(attn_mask):
    return None if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double()


def references(q, k, v, attn_mask, kpm, p, causal, scale, keep):
    """(float64 reference, torch's best in q's dtype): the math reference in the dtype, or torch's
    SDPA kernels where they apply (far better than the math path in float16 / bfloat16)."""
    am64 = attn_mask if attn_mask is not None and attn_mask.dtype == torch.bool else _am64(attn_mask)
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), am64, kpm, p, causal, scale, keep)
    theirs = reference.scaled_dot_product_attention(q, k, v, attn_mask, kpm, p, causal, scale, keep)
    if p == 0:
        mask = _torch_mask(attn_mask, kpm)
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale) \
            if not (causal and mask is not None) else theirs
        if (sdpa.double() - ref).abs().max() < (theirs.double() - ref).abs().max():
            theirs = sdpa
    return ref, theirs


def slack(dtype):
    return {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 4e-3}[dtype]


CASES = [  # (B, H, Lq, Lk, D)
    (1, 1, 1, 1, 16), (2, 3, 7, 7, 32), (1, 2, 48, 48, 64), (2, 1, 129, 129, 80), (1, 2, 7, 129, 128),
    (1, 1, 129, 48, 64), (1, 1, 1, 1000, 64), (1, 1, 512, 512, 64), (1, 1, 200, 100, 256), (2, 2, 130, 190, 32),
    (1, 2, 300, 77, 128),
]


@pytest.mark.parametrize("B,H,Lq,Lk,D", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_matches_reference(rng_seed, B, H, Lq, Lk, D, dtype, causal):
    q, k, v = rand(B, H, Lq, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype)
    out = AF.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert out.shape == (B, H, Lq, D) and out.dtype == dtype and out.is_contiguous() and out.is_cuda
    ref, theirs = references(q, k, v, None, None, 0.0, causal, None, None)
    assert_2x_rule(out, theirs, ref, f"fwd {dtype} causal={causal} {B, H, Lq, Lk, D}", seed=rng_seed, slack=slack(dtype))


@pytest.mark.parametrize("kind", ["key_padding", "bool", "float", "full_rows"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [40, 64])
def test_masks(rng_seed, kind, causal, dtype, D):
    B, H, Lq, Lk = 2, 3, 70, 90
    q, k, v = rand(B, H, Lq, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype)
    attn_mask, kpm = make_mask(kind, B, H, Lq, Lk, dtype)
    out = AF.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, key_padding_mask=kpm, is_causal=causal)
    ref, theirs = references(q, k, v, attn_mask, kpm, 0.0, causal, None, None)
    assert not torch.isnan(out).any()
    assert_2x_rule(out, theirs, ref, f"mask {kind} causal={causal} {dtype} D={D}", seed=rng_seed, slack=slack(dtype))
    if kind == "full_rows":
        assert torch.equal(out[:, :, ::3], torch.zeros_like(out[:, :, ::3]))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("D", [24, 64, 128])
@pytest.mark.parametrize("kind,causal,p", [("none", False, 0.0), ("key_padding", True, 0.0), ("float", False, 0.2),
                                           ("full_rows", False, 0.0), ("bool", True, 0.1)])
def test_backward_matches_reference(rng_seed, dtype, D, kind, causal, p):
    B, H, Lq, Lk = 2, 2, 67, 75
    q, k, v = rand(B, H, Lq, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype)
    attn_mask, kpm = make_mask(kind, B, H, Lq, Lk, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, keep = AF.scaled_dot_product_attention(*leaves, attn_mask=attn_mask, key_padding_mask=kpm, dropout_p=p,
                                                is_causal=causal, return_dropout_mask=True)
    grad = torch.randn_like(out)
    out.backward(grad)
    am64 = attn_mask if attn_mask is not None and attn_mask.dtype == torch.bool else _am64(attn_mask)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference.scaled_dot_product_attention(*ref_leaves, am64, kpm, p, causal, None, keep).backward(grad.double())
    t_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    reference.scaled_dot_product_attention(*t_leaves, attn_mask, kpm, p, causal, None, keep).backward(grad)
    for name, ours, r, t in zip("qkv", leaves, ref_leaves, t_leaves):
        assert ours.grad.dtype == dtype and not torch.isnan(ours.grad).any()
        assert_2x_rule(ours.grad, t.grad, r.grad, f"grad {name} {dtype} D={D} {kind} causal={causal} p={p}",
                       seed=rng_seed, slack=10 * slack(dtype) if dtype != torch.float64 else 1e-10)
    if kind == "full_rows":
        assert torch.equal(leaves[0].grad[:, :, ::3], torch.zeros_like(leaves[0].grad[:, :, ::3]))


def test_gradcheck_float64():
    q, k, v = (torch.randn(1, 2, s, 6, dtype=torch.float64, device=DEV, requires_grad=True) for s in (5, 7, 7))
    pad = torch.tensor([[False, False, True, False, False, True, False]], device=DEV)
    seed = torch.tensor([9], dtype=torch.int64)
    assert torch.autograd.gradcheck(lambda q, k, v: AF.scaled_dot_product_attention(q, k, v), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: AF.scaled_dot_product_attention(q, k, v, key_padding_mask=pad, is_causal=True, dropout_p=0.3,
                                                        seed=seed), (q, k, v))


@pytest.mark.parametrize("dtype,D", [(torch.float32, 16), (torch.bfloat16, 64), (torch.float16, 32)])
def test_opcheck(dtype, D):
    q, k, v = (rand(2, 2, s, D, dtype=dtype).requires_grad_() for s in (5, 9, 9))
    pad = (torch.rand(2, 9) < 0.3).to(DEV)
    mask = torch.randn(5, 9, device=DEV)
    seed = torch.tensor([5], dtype=torch.int64)
    torch.library.opcheck(torch.ops.aiayn.attention_fwd.default, (q, k, v, None, None, 0.0, False, 0.25, seed))
    torch.library.opcheck(torch.ops.aiayn.attention_fwd.default, (q, k, v, mask, pad, 0.2, True, 0.25, seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_out_contract(dtype):
    """attention_fwd(float_out=True) gives float32 rows for a reduced-precision q (the CUDA kernels
    still compute them in q's dtype: the same values widened) and q's dtype otherwise;
    attention_bwd takes either. (functional asks for float_out on the CPU only.)"""
    q, k, v = (rand(2, 2, s, 64, dtype=dtype) for s in (37, 45, 45))
    pad = (torch.rand(2, 45) < 0.3).to(DEV)
    seed = torch.tensor([5], dtype=torch.int64)
    args = (q, k, v, None, pad, 0.2, True, 0.125, seed)
    out, lse = torch.ops.aiayn.attention_fwd(*args)
    wide, _ = torch.ops.aiayn.attention_fwd(*args, float_out=True)
    assert wide.dtype == (torch.float32 if dtype in HALF else dtype)
    assert torch.equal(wide.to(dtype), out)
    grad = rand(*out.shape, dtype=dtype)
    for g, gw in zip(torch.ops.aiayn.attention_bwd(grad, q, k, v, out, lse, None, pad, 0.2, True, 0.125, seed),
                     torch.ops.aiayn.attention_bwd(grad, q, k, v, wide, lse, None, pad, 0.2, True, 0.125, seed)):
        assert torch.equal(g, gw)


def test_torch_compile_fullgraph(rng_seed):
    q, k, v = (rand(2, 2, 20, 64, dtype=torch.bfloat16) for _ in range(3))
    pad = torch.zeros(2, 20, dtype=torch.bool, device=DEV)
    pad[:, -3:] = True

    def f(q, k, v):
        return AF.scaled_dot_product_attention(q * 2, k, v, key_padding_mask=pad, is_causal=True).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


@pytest.mark.parametrize("dtype,D", [(torch.float32, 32), (torch.bfloat16, 64), (torch.float16, 128)])
def test_dropout_exact_and_keep_rate(dtype, D):
    q, k, v = (rand(2, 3, 50, D, dtype=dtype) for _ in range(3))
    torch.manual_seed(1)
    out, keep = AF.scaled_dot_product_attention(q, k, v, dropout_p=0.25, return_dropout_mask=True)
    torch.manual_seed(1)
    out2 = AF.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    assert torch.equal(out, out2), "reproducible under torch.manual_seed"
    assert keep.shape == (2, 3, 50, 50) and keep.is_cuda
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), dropout_p=0.25, keep_mask=keep)
    theirs = reference.scaled_dot_product_attention(q, k, v, dropout_p=0.25, keep_mask=keep)
    assert_2x_rule(out, theirs, ref, f"dropout {dtype}", slack=slack(dtype))
    rate = keep.float().mean().item()
    assert abs(rate - 0.75) < 5 * math.sqrt(0.75 * 0.25 / keep.numel())
    assert torch.equal(AF.scaled_dot_product_attention(q, k, v, dropout_p=0.25, training=False),
                       AF.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("D,causal,kind,p", [(64, False, "key_padding", 0.0), (64, True, "none", 0.15),
                                             (40, False, "float", 0.3), (128, True, "bool", 0.1)])
def test_same_as_cpu(dtype, D, causal, kind, p):
    """Same inputs and seed on both devices: the same dropout mask, outputs and gradients up to
    rounding (the CPU op is the reference implementation of the semantics)."""
    B, H, Lq, Lk = 2, 2, 45, 83
    q, k, v = (rand(B, H, L, D, dtype=dtype, device="cpu") for L in (Lq, Lk, Lk))
    attn_mask, kpm = make_mask(kind, B, H, Lq, Lk, dtype)
    seed = torch.tensor([1234567], dtype=torch.int64)
    grad = rand(B, H, Lq, D, dtype=dtype, device="cpu")
    results = {}
    for dev in ("cpu", DEV):
        leaves = [t.to(dev).requires_grad_() for t in (q, k, v)]
        out, keep = AF.scaled_dot_product_attention(
            *leaves, attn_mask=None if attn_mask is None else attn_mask.to(dev),
            key_padding_mask=None if kpm is None else kpm.to(dev), dropout_p=p, is_causal=causal, seed=seed,
            return_dropout_mask=True)
        out.backward(grad.to(dev))
        results[dev] = [t.detach().cpu() for t in (out, keep, *(x.grad for x in leaves))]
    assert torch.equal(results["cpu"][1], results[DEV][1]), "dropout masks differ"
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float64: 1e-12}[dtype]
    for name, a, b in zip(["out", "grad q", "grad k", "grad v"], results["cpu"][:1] + results["cpu"][2:],
                          results[DEV][:1] + results[DEV][2:]):
        err = (a.double() - b.double()).abs().max().item()
        assert err <= tol * max(1.0, a.double().abs().max().item()), f"{name} {dtype}: CPU vs CUDA differ by {err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Lq,Lk", [(16, 8, 1, 48), (16, 8, 2, 48), (1, 1, 1, 1), (4, 8, 4, 300),
                                        (1, 2, 1, 5000), (1, 1, 3, 20000)])
def test_decode_step(rng_seed, dtype, B, H, Lq, Lk):
    """1..4 query rows against a KV cache; long caches with few heads take the split-K path."""
    D = 64
    q, k, v = rand(B, H, Lq, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype)
    pad = torch.rand(B, Lk, device=DEV) < 0.2
    pad[:, 0] = False
    for causal in (False, True):
        out = AF.scaled_dot_product_attention(q, k, v, key_padding_mask=pad, is_causal=causal)
        ref, theirs = references(q, k, v, None, pad, 0.0, causal, None, None)
        assert_2x_rule(out, theirs, ref, f"decode {dtype} Lq={Lq} Lk={Lk} causal={causal}", seed=rng_seed,
                       slack=slack(dtype))
    # Dropout through the split path: the mask of the call, exactly.
    out, keep = AF.scaled_dot_product_attention(q, k, v, dropout_p=0.2, return_dropout_mask=True)
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), dropout_p=0.2, keep_mask=keep)
    theirs = reference.scaled_dot_product_attention(q, k, v, dropout_p=0.2, keep_mask=keep)
    assert_2x_rule(out, theirs, ref, f"decode dropout {dtype}", seed=rng_seed, slack=slack(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views_of_fused_qkv(rng_seed, dtype):
    B, L, H, D = 2, 37, 4, 64
    qkv = rand(B, L, 3, H, D, dtype=dtype).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, D) views, last dim contiguous
    assert not q.is_contiguous() and q.stride(-1) == 1
    out = AF.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref, theirs = references(q.detach(), k.detach(), v.detach(), None, None, 0.0, True, None, None)
    assert_2x_rule(out, theirs, ref, f"fused qkv views {dtype}", seed=rng_seed, slack=slack(dtype))
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and not torch.isnan(qkv.grad).any()
    # Rows not 16-byte aligned (an odd element offset) and a strided last dim: copied, same results.
    base = rand(B * H * L * D + 1, dtype=dtype)
    qo = base[1:].view(B, H, L, D)
    qt = rand(B, H, D, L, dtype=dtype).transpose(-1, -2)
    for qq in (qo, qt):
        out2 = AF.scaled_dot_product_attention(qq, k.detach(), v.detach())
        ref2, theirs2 = references(qq, k.detach(), v.detach(), None, None, 0.0, False, None, None)
        assert_2x_rule(out2, theirs2, ref2, f"odd layout {dtype}", seed=rng_seed, slack=slack(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits_do_not_overflow(rng_seed, dtype):
    q, k, v = rand(1, 2, 33, 64, scale=30.0), rand(1, 2, 40, 64, scale=30.0), rand(1, 2, 40, 64)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = AF.scaled_dot_product_attention(q, k, v)
    assert torch.isfinite(out).all()
    ref, theirs = references(q, k, v, None, None, 0.0, False, None, None)
    assert_2x_rule(out, theirs, ref, f"large logits {dtype}", seed=rng_seed, slack=5e-3 if dtype == torch.float32 else 5e-2)


def test_empty_and_degenerate():
    q = rand(0, 2, 5, 8)
    assert AF.scaled_dot_product_attention(q, q, q).shape == (0, 2, 5, 8)
    for dtype, D in ((torch.float32, 8), (torch.bfloat16, 64)):
        q = rand(1, 1, 3, D, dtype=dtype).requires_grad_()
        k, v = rand(1, 1, 0, D, dtype=dtype).requires_grad_(), rand(1, 1, 0, D, dtype=dtype).requires_grad_()
        out = AF.scaled_dot_product_attention(q, k, v)
        assert torch.equal(out, torch.zeros(1, 1, 3, D, dtype=dtype, device=DEV))
        out.sum().backward()
        assert torch.equal(q.grad, torch.zeros_like(q))


@pytest.mark.parametrize("dtype,D", [(torch.float32, 8), (torch.float16, 64)])
def test_nan_input_propagates(dtype, D):
    q, k, v = rand(1, 1, 70, D, dtype=dtype), rand(1, 1, 70, D, dtype=dtype), rand(1, 1, 70, D, dtype=dtype)
    v[0, 0, 2, 3] = float("nan")
    out = AF.scaled_dot_product_attention(q, k, v)
    assert torch.isnan(out[..., 3]).all() and not torch.isnan(out[..., :3]).any()


def test_bad_inputs_name_the_argument():
    q, k, v = rand(2, 2, 5, 8), rand(2, 2, 6, 8), rand(2, 2, 6, 8)
    sdpa = AF.scaled_dot_product_attention
    with pytest.raises(ValueError, match="'k' must have head_dim"):
        sdpa(q, rand(2, 2, 6, 4), v)
    with pytest.raises(TypeError, match="'k' has dtype"):
        sdpa(q, k.double(), v)
    with pytest.raises(RuntimeError, match="'k' is on"):
        sdpa(q, k.cpu(), v)
    with pytest.raises(RuntimeError, match="'key_padding_mask' is on"):
        sdpa(q, k, v, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="'attn_mask'.*not broadcastable"):
        sdpa(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match="head_dim"):
        big = rand(1, 1, 2, 300)
        sdpa(big, big, big)


def test_sanitizer_smoke():
    """One small call through every kernel (tensor-core forward / backward, SIMT forward / backward,
    split-K decode, masks, dropout): scripts/cuda_check.sh runs this under compute-sanitizer."""
    pad = torch.zeros(2, 77, dtype=torch.bool, device=DEV)
    pad[0, 70:] = True
    for dtype, D, Lq, Lk in ((torch.bfloat16, 64, 70, 77), (torch.float16, 32, 3, 77), (torch.float32, 40, 70, 77),
                             (torch.float16, 128, 17, 77)):
        q, k, v = (rand(2, 2, L, D, dtype=dtype).requires_grad_() for L in (Lq, Lk, Lk))
        out = AF.scaled_dot_product_attention(q, k, v, key_padding_mask=pad, is_causal=True, dropout_p=0.1)
        out.sum().backward()
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    q, k, v = rand(1, 1, 1, 64), rand(1, 1, 4000, 64), rand(1, 1, 4000, 64)
    assert torch.isfinite(AF.scaled_dot_product_attention(q, k, v)).all()  # split-K decode
