"""CUDA kernels of add_dropout_layer_norm and dropout_mask (LayerNorm(residual + dropout(x)), the
sub-layer connection of §3.1 / §5.4): parity with the float64 reference, the same dropout mask and
results as the CPU kernels, opcheck, gradcheck and torch.compile. Needs a CUDA GPU; skipped
elsewhere (the kernels still compile there).

Accuracy rule ("2x rule"): in a dtype, our max abs error against the float64 reference is at most
twice torch's own (F.layer_norm and its autograd run in that dtype) plus a slack: 1e-6 (relative
to the largest reference value, at least 1) and half an ulp of the largest reference value in the
dtype (the rounding of the result to the output dtype, which nobody can avoid)."""

import pytest
import torch
import torch.nn.functional as F

import aiayn
from aiayn import functional as AF
from aiayn import reference as R

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA kernels compiled but not run here"),
]

DEV = "cuda"
EPS = 1e-5
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def seed_of(v):
    return torch.tensor([v], dtype=torch.int64)


def make_inputs(rows, d, dtype, *, affine=True, wdtype=None, x_layout="contiguous"):
    """x, residual (rows, d) in dtype on CUDA, weight/bias (d,) (in wdtype, default dtype) or None.
    x_layout: "contiguous"; "slice_odd", a column slice at offset 1 of a (rows, d + 3) tensor (rows
    never 16-byte aligned: the scalar path); "slice_aligned", columns [0, d) of a (rows, d + 16)
    tensor (rows 16-byte aligned when d is a multiple of the vector width: the vectorised path)."""
    g = torch.Generator().manual_seed(rows * 7919 + d)
    pad, offset = {"contiguous": (0, 0), "slice_odd": (3, 1), "slice_aligned": (16, 0)}[x_layout]
    x = torch.randn(rows, d + pad, generator=g).to(DEV, dtype)[:, offset:offset + d]
    residual = (torch.randn(rows, d, generator=g) + 0.5).to(DEV, dtype)
    weight = bias = None
    if affine:
        weight = (1 + 0.1 * torch.randn(d, generator=g)).to(DEV, wdtype or dtype)
        bias = (0.1 * torch.randn(d, generator=g)).to(DEV, wdtype or dtype)
    return x, residual, weight, bias


def ref64(x, residual, weight, bias, p, mask):
    f = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return R.add_dropout_layer_norm(f(x), f(residual), f(weight), f(bias), p, EPS, keep_mask=mask)


def torch_in_dtype(x, residual, weight, bias, p, mask):
    """The same computation with torch's own kernels in x's dtype (weights cast to it)."""
    dt = x.dtype
    w = None if weight is None else weight.to(dt)
    b = None if bias is None else bias.to(dt)
    return R.add_dropout_layer_norm(x, residual, w, b, p, EPS, keep_mask=mask)


def slack(dtype, ref):
    amax = ref.abs().max().item() if ref.numel() else 0.0
    return 1e-6 * max(1.0, amax) + 0.5 * torch.finfo(dtype).eps * amax


def max_err(a, ref):
    return (a.double() - ref).abs().max().item() if ref.numel() else 0.0


def assert_2x(ours, torchs, ref, dtype, what):
    e_ours, e_torch = max_err(ours, ref), max_err(torchs, ref)
    bound = 2 * e_torch + slack(dtype, ref)
    assert e_ours <= bound, f"{what}: our error {e_ours:.3g} > 2 x torch's {e_torch:.3g} + slack = {bound:.3g}"


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


# --- parity with the float64 reference (forward and backward) --------------------------------


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("rows", [1, 3, 257])
@pytest.mark.parametrize("d", [1, 7, 64, 512, 1000, 4099])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_parity_2x_rule(dtype_name, d, rows, p):
    dtype = DTYPES[dtype_name]
    x, residual, weight, bias = make_inputs(rows, d, dtype)
    seed = seed_of(1234 + d)
    xs, rs, ws, bs = leaf(x), leaf(residual), leaf(weight), leaf(bias)
    out, mask = AF.add_dropout_layer_norm(xs, rs, ws, bs, p=p, eps=EPS, seed=seed, return_dropout_mask=True)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert mask.device.type == "cuda"

    x64, r64, w64, b64 = (leaf(t.double()) for t in (x, residual, weight, bias))
    ref = R.add_dropout_layer_norm(x64, r64, w64, b64, p, EPS, keep_mask=mask)
    xt, rt, wt, bt = leaf(x), leaf(residual), leaf(weight), leaf(bias)
    theirs = torch_in_dtype(xt, rt, wt, bt, p, mask)
    assert_2x(out, theirs, ref.detach(), dtype, "out")

    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(d + rows)).to(DEV, dtype)
    out.backward(dy)
    ref.backward(dy.double())
    theirs.backward(dy)
    for name, ours_t, torch_t, ref_t in [("grad_x", xs, xt, x64), ("grad_residual", rs, rt, r64),
                                          ("grad_weight", ws, wt, w64), ("grad_bias", bs, bt, b64)]:
        assert ours_t.grad.dtype == ours_t.dtype and ours_t.grad.shape == ours_t.shape
        assert_2x(ours_t.grad, torch_t.grad, ref_t.grad, dtype, name)


@pytest.mark.parametrize("x_layout", ["slice_odd", "slice_aligned"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("d", [7, 64, 1000])
def test_parity_non_contiguous_x(dtype_name, d, x_layout):
    dtype = DTYPES[dtype_name]
    x, residual, weight, bias = make_inputs(33, d, dtype, x_layout=x_layout)
    assert not x.is_contiguous()
    p, seed = 0.1, seed_of(77)
    xs, rs, ws, bs = leaf(x), leaf(residual), leaf(weight), leaf(bias)
    out, mask = AF.add_dropout_layer_norm(xs, rs, ws, bs, p=p, seed=seed, return_dropout_mask=True)
    x64, r64, w64, b64 = (leaf(t.double()) for t in (x, residual, weight, bias))
    ref = R.add_dropout_layer_norm(x64, r64, w64, b64, p, EPS, keep_mask=mask)
    xt, rt, wt, bt = leaf(x), leaf(residual), leaf(weight), leaf(bias)
    theirs = torch_in_dtype(xt, rt, wt, bt, p, mask)
    assert_2x(out, theirs, ref.detach(), dtype, "out")
    # The same values as with a contiguous copy of x (the layout only changes the loads).
    out_c = AF.add_dropout_layer_norm(x.contiguous(), residual, weight, bias, p=p, seed=seed)
    torch.testing.assert_close(out.detach(), out_c, rtol=0, atol=0)
    dy = torch.randn(out.shape, device=DEV).to(dtype)
    out.backward(dy)
    ref.backward(dy.double())
    theirs.backward(dy)
    assert_2x(xs.grad, xt.grad, x64.grad, dtype, "grad_x")
    assert_2x(ws.grad, wt.grad, w64.grad, dtype, "grad_weight")


@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
def test_float32_weight_with_low_precision_x(dtype_name):
    dtype = DTYPES[dtype_name]
    x, residual, weight, bias = make_inputs(65, 512, dtype, wdtype=torch.float32)
    xs, rs, ws, bs = leaf(x), leaf(residual), leaf(weight), leaf(bias)
    out, mask = AF.add_dropout_layer_norm(xs, rs, ws, bs, p=0.1, seed=seed_of(5), return_dropout_mask=True)
    assert out.dtype == dtype
    x64, r64, w64, b64 = (leaf(t.double()) for t in (x, residual, weight, bias))
    ref = R.add_dropout_layer_norm(x64, r64, w64, b64, 0.1, EPS, keep_mask=mask)
    xt, rt, wt, bt = leaf(x), leaf(residual), leaf(weight), leaf(bias)
    theirs = torch_in_dtype(xt, rt, wt, bt, 0.1, mask)
    assert_2x(out, theirs, ref.detach(), dtype, "out")
    dy = torch.randn(out.shape, device=DEV).to(dtype)
    out.backward(dy)
    ref.backward(dy.double())
    theirs.backward(dy)
    assert ws.grad.dtype == torch.float32 and bs.grad.dtype == torch.float32
    assert_2x(xs.grad, xt.grad, x64.grad, dtype, "grad_x")
    # torch's weight gradient is rounded to dtype, ours stays in float32: compare with the reference.
    torch.testing.assert_close(ws.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bs.grad.double(), b64.grad, rtol=1e-4, atol=1e-4)


def test_float64():
    x, residual, weight, bias = make_inputs(17, 300, torch.float64)
    out, mask = AF.add_dropout_layer_norm(x, residual, weight, bias, p=0.2, seed=seed_of(9), return_dropout_mask=True)
    _, mean, rstd = torch.ops.aiayn.add_dropout_layer_norm_fwd(x, residual, weight, bias, 0.2, EPS, seed_of(9))
    assert out.dtype == torch.float64 and mean.dtype == torch.float64 and rstd.dtype == torch.float64
    # dropout's scale is 1 / (1 - p) rounded to float32, as on the CPU: within 1e-7 relative.
    torch.testing.assert_close(out, ref64(x, residual, weight, bias, 0.2, mask), rtol=1e-6, atol=1e-6)
    out0 = AF.add_dropout_layer_norm(x, residual, weight, bias, p=0.0)
    torch.testing.assert_close(out0, ref64(x, residual, weight, bias, 0.0, None), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
def test_long_rows(dtype_name, affine):
    """Rows past the shared-memory caches: the backward's cache stops at about 18k float32 columns
    on an H100 (227 KiB), the forward's at about 58k; longer rows recompute from global memory."""
    dtype = DTYPES[dtype_name]
    for d in (8192, 20000, 70001):
        x, residual, weight, bias = make_inputs(3, d, dtype, affine=affine)
        xs, rs, ws, bs = leaf(x), leaf(residual), leaf(weight), leaf(bias)
        out, mask = AF.add_dropout_layer_norm(xs, rs, ws, bs, p=0.1, seed=seed_of(d), return_dropout_mask=True)
        x64, r64, w64, b64 = (leaf(None if t is None else t.double()) for t in (x, residual, weight, bias))
        ref = R.add_dropout_layer_norm(x64, r64, w64, b64, 0.1, EPS, keep_mask=mask)
        xt, rt, wt, bt = leaf(x), leaf(residual), leaf(weight), leaf(bias)
        theirs = torch_in_dtype(xt, rt, wt, bt, 0.1, mask)
        assert_2x(out, theirs, ref.detach(), dtype, f"out d={d}")
        dy = torch.randn(out.shape, device=DEV).to(dtype)
        out.backward(dy)
        ref.backward(dy.double())
        theirs.backward(dy)
        assert_2x(xs.grad, xt.grad, x64.grad, dtype, f"grad_x d={d}")
        assert_2x(rs.grad, rt.grad, r64.grad, dtype, f"grad_residual d={d}")
        if affine:
            assert_2x(ws.grad, wt.grad, w64.grad, dtype, f"grad_weight d={d}")
            assert_2x(bs.grad, bt.grad, b64.grad, dtype, f"grad_bias d={d}")


def test_many_rows_and_3d_input():
    """More rows than resident blocks (grid-stride), leading dims folded into rows, a transposed
    input (copied to rows)."""
    x, residual, weight, bias = make_inputs(3 * 4099, 64, torch.float32)
    x3, r3 = x.view(3, 4099, 64), residual.view(3, 4099, 64)
    out, mask = AF.add_dropout_layer_norm(x3, r3, weight, bias, p=0.3, seed=seed_of(3), return_dropout_mask=True)
    assert out.shape == (3, 4099, 64)
    torch.testing.assert_close(out.double(), ref64(x3, r3, weight, bias, 0.3, mask), rtol=1e-5, atol=2e-5)
    xt, rt = x3.transpose(0, 1), r3.transpose(0, 1)  # (4099, 3, 64), rows not one stride apart
    out_t, mask_t = AF.add_dropout_layer_norm(xt, rt, weight, bias, p=0.3, seed=seed_of(3), return_dropout_mask=True)
    torch.testing.assert_close(out_t.double(), ref64(xt, rt, weight, bias, 0.3, mask_t), rtol=1e-5, atol=2e-5)


def test_zero_rows():
    for shape in [(0, 16), (2, 0, 16)]:
        x = torch.randn(shape, device=DEV, requires_grad=True)
        r = torch.randn(shape, device=DEV, requires_grad=True)
        w = torch.ones(16, device=DEV, requires_grad=True)
        out = AF.add_dropout_layer_norm(x, r, w, None, p=0.1, seed=seed_of(1))
        assert out.shape == shape
        out.sum().backward()
        assert x.grad.shape == shape and w.grad.shape == (16,) and torch.all(w.grad == 0)


def test_p_one_drops_everything():
    x, residual, weight, bias = make_inputs(5, 40, torch.float32)
    out, mask = AF.add_dropout_layer_norm(x, residual, weight, bias, p=1.0, seed=seed_of(2), return_dropout_mask=True)
    assert not mask.any()
    torch.testing.assert_close(out, F.layer_norm(residual, (40,), weight, bias, EPS), rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic():
    x, residual, weight, bias = make_inputs(1000, 512, torch.float32)
    dy = torch.randn(1000, 512, device=DEV)
    _, mean, rstd = torch.ops.aiayn.add_dropout_layer_norm_fwd(x, residual, weight, bias, 0.1, EPS, seed_of(4))
    a = torch.ops.aiayn.add_dropout_layer_norm_bwd(dy, x, residual, weight, mean, rstd, 0.1, seed_of(4))
    b = torch.ops.aiayn.add_dropout_layer_norm_bwd(dy, x, residual, weight, mean, rstd, 0.1, seed_of(4))
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# --- CUDA against CPU -------------------------------------------------------------------------


# With d == 1 the variance is 0 and rstd = 1 / sqrt(eps) ~ 316 magnifies any difference between
# the h = residual + dropout(x) of the forward and the one the backward recomputes. The CUDA kernels
# compute both with the same code (x * scale rounded before the add: xhat is exactly 0); the CPU
# AVX2/AVX-512 kernels round them differently when p > 0 (the generic one does not), which leaves
# a grad_weight of about 1e-5 instead of 0.
_CPU_D1_DROPOUT = pytest.mark.xfail(strict=False, reason="CPU AVX kernels recompute h with another rounding "
                                    "in the backward (d == 1, p > 0 magnifies it to ~1e-5 in grad_weight)")


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("rows,d", [(1, 1), (3, 7), (64, 512), (5, 1000), (2, 4099)])
def test_cross_device_fp32(rows, d, p, request):
    if d == 1 and p > 0:
        request.applymarker(_CPU_D1_DROPOUT)
    x, residual, weight, bias = make_inputs(rows, d, torch.float32)
    seed = seed_of(987654321 + d)
    dy = torch.randn(rows, d, generator=torch.Generator().manual_seed(d)).to(DEV)
    results = {}
    for dev in ("cpu", "cuda"):
        xs, rs, ws, bs = (leaf(t.to(dev)) for t in (x, residual, weight, bias))
        out, mask = AF.add_dropout_layer_norm(xs, rs, ws, bs, p=p, seed=seed, return_dropout_mask=True)
        out.backward(dy.to(dev))
        results[dev] = [out.detach(), mask, xs.grad, rs.grad, ws.grad, bs.grad]
    cpu, cuda = results["cpu"], [t.cpu() for t in results["cuda"]]
    assert torch.equal(cpu[1], cuda[1]), "dropout masks differ between CPU and CUDA"
    for name, a, b in zip(["out", "mask", "grad_x", "grad_residual", "grad_weight", "grad_bias"], cpu, cuda):
        if name == "mask":
            continue
        # weight/bias gradients are sums over rows: 1e-5 relative to their size
        tol = 1e-5 * max(1.0, a.abs().max().item()) if name in ("grad_weight", "grad_bias") else 1e-5
        torch.testing.assert_close(b, a, rtol=0, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.1, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("shape", [(1,), (3,), (4,), (5,), (7, 3), (2, 3, 1001), (4099,), (0, 5)])
def test_dropout_mask_matches_cpu(shape, p):
    for s in (0, 1, -1, 2**62 + 12345):
        seed = seed_of(s)
        like = torch.empty(shape, device=DEV, dtype=torch.float16)
        m_cuda = AF.dropout_mask(like, p, seed)
        m_cpu = AF.dropout_mask(torch.empty(shape), p, seed)
        assert m_cuda.dtype == torch.bool and m_cuda.shape == like.shape and m_cuda.device.type == "cuda"
        assert torch.equal(m_cuda.cpu(), m_cpu)
        if s != -1:  # the reference takes non-negative seeds
            assert torch.equal(m_cuda.cpu(), R.dropout_mask(shape, p, s))


def test_dropout_mask_large_and_non_contiguous_like():
    like = torch.empty(3000, 1001, device=DEV)[:, ::2]  # non-contiguous: the mask is row-major anyway
    m = AF.dropout_mask(like, 0.25, seed_of(42))
    assert m.is_contiguous() and m.shape == like.shape
    assert torch.equal(m.cpu(), AF.dropout_mask(torch.empty(like.shape), 0.25, seed_of(42)))
    assert abs(m.float().mean().item() - 0.75) < 0.01


# --- argument checks on CUDA -------------------------------------------------------------------


def test_errors_name_the_argument():
    x, residual, weight, bias = make_inputs(4, 8, torch.float32)
    with pytest.raises(RuntimeError, match="'weight'"):
        AF.add_dropout_layer_norm(x, residual, weight.cpu(), bias)
    with pytest.raises(RuntimeError, match="'residual'"):
        AF.add_dropout_layer_norm(x, residual.cpu(), weight, bias)
    with pytest.raises(TypeError, match="'residual'"):
        AF.add_dropout_layer_norm(x, residual.half(), weight, bias)
    with pytest.raises(ValueError, match="'bias'"):
        AF.add_dropout_layer_norm(x, residual, weight, bias[:4])
    with pytest.raises(TypeError, match="'x'"):
        AF.add_dropout_layer_norm(x.int(), residual.int())
    with pytest.raises(RuntimeError, match="'seed'"):
        AF.add_dropout_layer_norm(x, residual, p=0.1, seed=seed_of(1).to(DEV))
    _, mean, rstd = torch.ops.aiayn.add_dropout_layer_norm_fwd(x, residual, weight, bias, 0.0, EPS, seed_of(0))
    with pytest.raises(RuntimeError, match="'mean'"):
        torch.ops.aiayn.add_dropout_layer_norm_bwd(x, x, residual, weight, mean.cpu(), rstd, 0.0, seed_of(0))
    with pytest.raises(ValueError, match="'mean' and 'rstd'"):
        torch.ops.aiayn.add_dropout_layer_norm_bwd(x, x, residual, weight, mean[:2], rstd, 0.0, seed_of(0))


# --- the op as a PyTorch citizen ---------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
def test_opcheck(dtype_name):
    dtype = DTYPES[dtype_name]
    x, residual, weight, bias = make_inputs(6, 24, dtype)
    seed = seed_of(11)
    fwd = (x.requires_grad_(), residual.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), 0.1, EPS, seed)
    torch.library.opcheck(torch.ops.aiayn.add_dropout_layer_norm_fwd.default, fwd)
    torch.library.opcheck(torch.ops.aiayn.add_dropout_layer_norm_fwd.default,
                          (x.detach(), residual.detach(), None, None, 0.0, EPS, seed))
    _, mean, rstd = torch.ops.aiayn.add_dropout_layer_norm_fwd(*[t.detach() if torch.is_tensor(t) else t for t in fwd])
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.aiayn.add_dropout_layer_norm_bwd.default,
                          (dy, x.detach(), residual.detach(), weight.detach(), mean, rstd, 0.1, seed))
    torch.library.opcheck(torch.ops.aiayn.dropout_mask.default, (x.detach(), 0.1, seed))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("d", [7, 16])  # 7: one element at a time; 16: 16-byte vectors of 2 doubles
def test_gradcheck_float64(d, p):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(3, d, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    r = torch.randn(3, d, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    w = (1 + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)).to(DEV).requires_grad_()
    b = (0.1 * torch.randn(d, generator=g, dtype=torch.float64)).to(DEV).requires_grad_()
    seed = seed_of(2024)
    fn = lambda x, r, w, b: AF.add_dropout_layer_norm(x, r, w, b, p=p, seed=seed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, r, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_torch_compile_fullgraph():
    x, residual, weight, bias = make_inputs(8, 128, torch.float32)
    seed = seed_of(99)

    def f(x, r, w, b, s):
        return AF.add_dropout_layer_norm(torch.relu(x), r, w, b, p=0.1, seed=s) * 2.0

    compiled = torch.compile(f, fullgraph=True)
    xs, rs, ws, bs = leaf(x), leaf(residual), leaf(weight), leaf(bias)
    got = compiled(xs, rs, ws, bs, seed)
    xe, re, we, be = leaf(x), leaf(residual), leaf(weight), leaf(bias)
    want = f(xe, re, we, be, seed)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got.sum().backward()
    want.sum().backward()
    for a, b in [(xs, xe), (rs, re), (ws, we), (bs, be)]:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_sanitizer_smoke():
    """A few small calls over the kernels' paths (vectorised and scalar, dropout on and off,
    strided rows, fp16 and fp64): what scripts/cuda_check.sh runs under compute-sanitizer."""
    for dtype, d, layout, p in [(torch.float32, 64, "contiguous", 0.1), (torch.float32, 7, "slice_odd", 0.1),
                                (torch.float16, 24, "slice_aligned", 0.5), (torch.bfloat16, 33, "contiguous", 0.0),
                                (torch.float64, 10, "contiguous", 0.2)]:
        x, residual, weight, bias = make_inputs(3, d, dtype, x_layout=layout)
        xs, rs, ws, bs = leaf(x), leaf(residual), leaf(weight), leaf(bias)
        out, mask = AF.add_dropout_layer_norm(xs, rs, ws, bs, p=p, seed=seed_of(d), return_dropout_mask=True)
        out.backward(torch.ones_like(out))
        ref = ref64(x, residual, weight, bias, p, mask)
        assert max_err(out, ref) < 0.1
    torch.cuda.synchronize()


def test_build_reports_cuda():
    assert aiayn.build_info()["cuda"] is True
