"""linear_cross_entropy on the CPU: the pre-softmax projection fused with the label-smoothed
cross-entropy (§3.4, §5.4), chunked over rows. Losses and gradients against the float64 reference
by the 2x rule on every ISA, in float32 and bfloat16, with and without smoothing, ignored rows,
odd vocabularies and widths, many chunks and one, leading dims, strides, large logits, every
reduction, the recompute backward, the chunked PyTorch version registered for CUDA, opcheck,
torch.compile, reused scratch and bad calls."""

import math

import pytest
import torch
import torch.nn.functional as F

import aiayn
from aiayn import _ops
from aiayn import functional as AF
from aiayn import reference
from conftest import assert_2x_rule, num_threads

LCE = AF.linear_cross_entropy


def make(rows, d, V, dtype, ignore_frac=0.0, logit_scale=1.0, shape=None):
    x = torch.randn(rows, d) * logit_scale
    w = torch.randn(V, d) / max(d, 1) ** 0.5
    t = torch.randint(0, V, (rows,))
    t[torch.rand(rows) < ignore_frac] = -100
    t[:1] = torch.randint(0, V, (min(rows, 1),))  # one row counts (all ignored: test_all_ignored_matches_torch)
    if shape is not None:
        x, t = x.reshape(*shape, d), t.reshape(shape)
    return x.to(dtype), w.to(dtype), t


@pytest.fixture
def chunk_rows(monkeypatch):
    """Forces the kernel's rows per chunk (AIAYN_LCE_CHUNK_ROWS, read per call)."""
    def force(n):
        monkeypatch.setenv("AIAYN_LCE_CHUNK_ROWS", str(n))
    return force


def slack(ref, dtype):
    top = ref.abs().max().item() if ref.numel() else 0.0
    return 1e-6 + (2**-8 if dtype == torch.bfloat16 else 1e-6) * top


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def check_against_reference(x, w, t, eps, reduction, what, seed, upstream=None, with_nll=False, fn=LCE):
    """Loss (and nll) and both gradients of ours vs the float64 reference, torch's error in x's dtype
    as the yardstick."""
    xo, wo = leaves(x, w)
    xr, wr = leaves(x.double(), w.double())
    xt, wt = leaves(x, w)
    ours = fn(xo, wo, t, eps, -100, reduction, return_nll=True)
    ref = reference.linear_cross_entropy(xr, wr, t, eps, -100, reduction, return_nll=True)
    theirs = reference.linear_cross_entropy(xt, wt, t, eps, -100, reduction, return_nll=True)
    for name, o, r, th in zip(("loss", "nll"), ours, ref, theirs):
        assert o.shape == r.shape and o.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
        assert_2x_rule(o, th, r, f"{what} {name}", seed=seed, slack=slack(r, x.dtype))
    if upstream is None:
        upstream = torch.randn(ours[0].shape).double()
    outs = [(o[0] * upstream.to(o[0].dtype)).sum() + ((o[1] * 0.5).sum() if with_nll else 0) for o in (ours, ref)]
    outs.append((theirs[0] * upstream.to(theirs[0].dtype)).sum() + ((theirs[1] * 0.5).sum() if with_nll else 0))
    for out in outs:
        out.backward()
    for name, o, r, th in (("grad x", xo, xr, xt), ("grad weight", wo, wr, wt)):
        assert o.grad.dtype == x.dtype and o.grad.shape == o.shape
        assert_2x_rule(o.grad, th.grad, r.grad, f"{what} {name}", seed=seed, slack=slack(r.grad, x.dtype))
    return ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("rows,d,V", [(1, 1, 1), (5, 7, 1), (37, 33, 7), (200, 64, 1000), (70, 129, 8003)])
def test_matches_reference(isa, rng_seed, dtype, eps, rows, d, V):
    x, w, t = make(rows, d, V, dtype, ignore_frac=0.2)
    for reduction in ("mean", "sum", "none"):
        check_against_reference(x, w, t, eps, reduction, f"{isa} {dtype} eps={eps} {rows}x{d}x{V} {reduction}",
                                rng_seed, upstream=torch.tensor(1.7).double() if reduction != "none" else None)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_bf16_every_gemm_mode(isa_bf16, rng_seed, chunk_rows, eps):
    """bf16 x and weight run the three GEMMs on bf16 operands (vdpbf16ps, AMX or widened by the
    mode) with float32 results: losses and both gradients by the 2x rule against torch's bf16, over
    several chunks (the float32 dW accumulation), a vocabulary that is no multiple of any panel,
    and ignored rows (whose gradient is exactly zero)."""
    chunk_rows(41)
    x, w, t = make(130, 72, 1031, torch.bfloat16, ignore_frac=0.25, logit_scale=3.0)
    for reduction in ("mean", "none"):
        check_against_reference(x, w, t, eps, reduction, f"{isa_bf16} eps={eps} {reduction}", rng_seed)
    xo, wo = leaves(x, w)
    LCE(xo, wo, t, eps).backward()
    assert torch.equal(xo.grad[t == -100], torch.zeros_like(xo.grad[t == -100]))


@pytest.mark.parametrize("chunk", [1, 7, 64, 10**6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_chunks_and_one(rng_seed, chunk_rows, chunk, dtype):
    """Chunks of 1 row, of 7 (a last partial chunk), of 64 and one chunk for all rows: the same
    results by the 2x rule, and the dW accumulation over chunks is right."""
    chunk_rows(chunk)
    x, w, t = make(150, 48, 1003, dtype, ignore_frac=0.1)
    for reduction in ("mean", "none"):
        check_against_reference(x, w, t, 0.1, reduction, f"chunk {chunk} {dtype} {reduction}", rng_seed)


def test_leading_dims_and_strides(isa, rng_seed):
    """(B, T, d) x, a transposed (non-contiguous) x, a weight whose rows are strided."""
    x, w, t = make(4 * 9, 40, 301, torch.float32, ignore_frac=0.3, shape=(4, 9))
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xt.is_contiguous()
    wide = torch.randn(301, 47)
    wide[:, :40] = w
    for xx, ww in ((x, w), (xt, w), (x, wide[:, :40])):
        ours = check_against_reference(xx, ww, t, 0.1, "none", f"{isa} strides", rng_seed)
        assert ours[0].shape == (4, 9)
    # A last dim that is itself strided.
    xs = torch.randn(36, 80)[:, ::2]
    check_against_reference(xs, w, t.reshape(-1), 0.0, "mean", f"{isa} strided last dim", rng_seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_logits(rng_seed, dtype):
    """Logits in the hundreds: exp would overflow without the max shift."""
    x, w, t = make(64, 32, 500, dtype, logit_scale=60.0)
    ours = check_against_reference(x, w, t, 0.1, "sum", f"large logits {dtype}", rng_seed)
    assert torch.isfinite(ours[0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_matches_torch(reduction):
    """Every row ignored: mean is 0/0 = NaN as in torch, sum 0, none zeros; gradients are zeros."""
    x, w, _ = make(12, 16, 30, torch.float32)
    t = torch.full((12,), -100)
    for eps in (0.0, 0.1):
        xo, wo = leaves(x, w)
        xt, wt = leaves(x, w)
        ours = LCE(xo, wo, t, eps, reduction=reduction)
        theirs = F.cross_entropy(xt @ wt.t(), t, label_smoothing=eps, reduction=reduction)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        ours.sum().backward()
        theirs.sum().backward()
        assert torch.equal(xo.grad, torch.zeros_like(x)) and torch.equal(wo.grad, torch.zeros_like(w))
        torch.testing.assert_close(xo.grad, xt.grad, equal_nan=True)


def test_ignore_index_other_value_and_empty(rng_seed):
    x, w, t = make(20, 16, 30, torch.float32)
    t[::3] = 7  # class 7 is the ignored one here
    xo, wo = leaves(x, w)
    ours = LCE(xo, wo, t, 0.1, ignore_index=7)
    theirs = F.cross_entropy(x @ w.t(), t, ignore_index=7, label_smoothing=0.1)
    torch.testing.assert_close(ours, theirs)
    empty = torch.empty(0, 16, requires_grad=True)
    assert math.isnan(LCE(empty, w, torch.empty(0, dtype=torch.long)).item())
    s = LCE(empty, w, torch.empty(0, dtype=torch.long), reduction="sum")
    s.backward()
    assert s.item() == 0.0 and empty.grad.shape == (0, 16)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_differentiated_too(rng_seed, reduction):
    """With the nll in the loss as well, backward recomputes the chunks (the precomputed gradient
    is the smoothed loss's alone)."""
    x, w, t = make(50, 24, 77, torch.float32, ignore_frac=0.2)
    check_against_reference(x, w, t, 0.1, reduction, f"nll too {reduction}", rng_seed, with_nll=True)


def test_return_nll_is_the_unsmoothed_loss(rng_seed):
    x, w, t = make(40, 24, 50, torch.float32, ignore_frac=0.2)
    loss, nll = LCE(x, w, t, 0.1, reduction="sum", return_nll=True)
    torch.testing.assert_close(nll, F.cross_entropy(x @ w.t(), t, reduction="sum"))
    torch.testing.assert_close(LCE(x, w, t, 0.0, reduction="sum"), nll)


def test_gradcheck_float64(isa, chunk_rows):
    chunk_rows(3)
    x, w, t = make(7, 5, 6, torch.float64, ignore_frac=0.2)
    x, w = leaves(x, w)
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(lambda x, w: LCE(x, w, t, 0.1, reduction=reduction), (x, w))
    assert torch.autograd.gradcheck(lambda x, w: sum(LCE(x, w, t, 0.2, reduction="mean", return_nll=True)), (x, w))


def test_chunked_pytorch_version(rng_seed):
    """The pure-PyTorch version registered for CUDA (not run on a GPU here), run on CPU tensors
    through the same autograd, against the reference."""
    x, w, t = make(90, 33, 1001, torch.float32, ignore_frac=0.2, shape=(9, 10))

    def fwd(x, w, t, eps, ignore_index, reduction, compute_grad):
        return _ops._linear_cross_entropy_fwd_chunked(x, w, t, eps, ignore_index, reduction, compute_grad,
                                                      chunk_bytes=40 * 4 * 1001)

    def bwd(*args):
        return _ops._linear_cross_entropy_bwd_chunked(*args, chunk_bytes=40 * 4 * 1001)

    class Chunked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, t, eps, reduction):
            loss, nll, lse, gx, gw = fwd(x, w, t, eps, -100, reduction, reduction != 0)
            ctx.save_for_backward(x, w, t, lse, gx, gw)
            ctx.args = eps, reduction
            return loss, nll

        @staticmethod
        def backward(ctx, g_loss, g_nll):
            x, w, t, lse, gx, gw = ctx.saved_tensors
            eps, reduction = ctx.args
            if reduction != 0 and not g_nll.any():
                return gx * g_loss, gw * g_loss, None, None, None
            scale = 1.0 / (t != -100).sum() if reduction == 1 else 1.0
            gx, gw = bwd((g_loss * scale).expand(t.shape), (g_nll * scale).expand(t.shape), x, w, t, lse, eps, -100)
            return gx, gw, None, None, None

    modes = {"none": 0, "mean": 1, "sum": 2}
    for reduction in modes:
        for with_nll in (False, True):
            def fn(x, w, t, eps, ignore_index, red, return_nll):
                return Chunked.apply(x, w, t, eps, modes[red])
            check_against_reference(x, w, t, 0.1, reduction, f"chunked torch {reduction}", rng_seed,
                                    with_nll=with_nll, fn=fn)
    with pytest.raises(ValueError, match="'target'"):
        fwd(x, w, torch.full_like(t, 1001), 0.0, -100, 1, False)


def test_opcheck():
    x, w, t = make(20, 11, 13, torch.float32, ignore_frac=0.2)
    x, w = leaves(x, w)
    for reduction, compute_grad in ((0, False), (1, False), (1, True), (2, True)):
        torch.library.opcheck(torch.ops.aiayn.linear_cross_entropy_fwd.default,
                              (x, w, t, 0.1, -100, reduction, compute_grad))
    lse = torch.ops.aiayn.linear_cross_entropy_fwd(x.detach(), w.detach(), t, 0.1, -100, 0, False)[2]
    g = torch.randn(20)
    torch.library.opcheck(torch.ops.aiayn.linear_cross_entropy_bwd.default,
                          (g, g * 0.5, x.detach(), w.detach(), t, lse, 0.1, -100))
    torch.library.opcheck(torch.ops.aiayn.linear_cross_entropy_bwd.default,
                          (g, None, x.detach(), w.detach(), t, lse, 0.1, -100))


def test_torch_compile_fullgraph(rng_seed):
    x, w, t = make(30, 16, 40, torch.float32, ignore_frac=0.2)

    def f(x, w, t):
        loss, nll = LCE(x * 2, w, t, 0.1, reduction="sum", return_nll=True)
        return loss / 3, nll

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xo, wo = leaves(x, w)
    xe, we = leaves(x, w)
    got, want = compiled(xo, wo, t), f(xe, we, t)
    torch.testing.assert_close(got, want)
    got[0].backward()
    want[0].backward()
    torch.testing.assert_close(xo.grad, xe.grad)
    torch.testing.assert_close(wo.grad, we.grad)


def test_autocast_casts_like_a_linear(rng_seed):
    """Under bf16 autocast float32 x and weight are cast to bf16 (as F.linear would be); the loss
    is float32 and gradients flow back to the float32 leaves."""
    x, w, t = make(40, 32, 100, torch.float32, ignore_frac=0.1)
    xo, wo = leaves(x, w)
    with torch.autocast("cpu", torch.bfloat16):
        loss = LCE(xo, wo, t, 0.1)
    loss.backward()
    assert loss.dtype == torch.float32 and xo.grad.dtype == torch.float32 and wo.grad.dtype == torch.float32
    xb, wb = leaves(x.bfloat16().float(), w.bfloat16().float())
    ref = LCE(xb, wb, t, 0.1)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(xo.grad, xb.grad, rtol=2**-7, atol=2**-7 * xb.grad.abs().max().item())


def test_threads_and_reused_scratch_do_not_change_bits(chunk_rows):
    """Reused scratch blocks (the chunk buffer, packed operands) may hold anything: a call after
    calls of NaN inputs and other sizes gives the same bits, at 1 and 2 threads."""
    chunk_rows(32)
    x, w, t = make(100, 40, 777, torch.float32, ignore_frac=0.2)

    def run():
        xo, wo = leaves(x, w)
        loss, nll = LCE(xo, wo, t, 0.1, reduction="sum", return_nll=True)
        loss.backward()
        return loss, nll, xo.grad, wo.grad

    first = run()
    xn, wn = leaves(torch.full_like(x, float("nan")), torch.full_like(w, float("nan")))
    LCE(xn, wn, t, 0.1).backward()
    LCE(*leaves(*make(333, 17, 2000, torch.float32)[:2]), torch.randint(0, 2000, (333,)), 0.1).backward()
    again = run()
    with num_threads(1):
        single = run()
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_bad_inputs_name_the_argument():
    x, w, t = make(6, 8, 10, torch.float32)
    cases = [
        (dict(x=torch.randn(())), ValueError, "'x' must have at least one dimension"),
        (dict(weight=w[:, :5]), ValueError, "'weight' must have shape"),
        (dict(weight=torch.randn(8)), ValueError, "'weight' must have shape"),
        (dict(weight=torch.empty(0, 8)), ValueError, "'weight' must have at least one row"),
        (dict(weight=w.double()), TypeError, "'weight' has dtype"),
        (dict(x=x.half(), weight=w.half()), TypeError, "'x' has dtype"),
        (dict(target=t[:5]), ValueError, "'target' must have shape"),
        (dict(target=t.reshape(2, 3)), ValueError, "'target' must have shape"),
        (dict(target=t.int()), TypeError, "'target' has dtype"),
        (dict(target=t.float()), TypeError, "'target' has dtype"),
        (dict(target=torch.full_like(t, 10)), ValueError, "'target' holds 10"),
        (dict(target=torch.full_like(t, -1)), ValueError, "'target' holds -1"),
        (dict(weight=w.to("meta")), ValueError, "'weight'.*device"),
        (dict(target=[1, 2]), TypeError, "'target' must be a tensor"),
        (dict(label_smoothing=1.5), ValueError, "'label_smoothing'"),
        (dict(label_smoothing=-0.1), ValueError, "'label_smoothing'"),
        (dict(reduction="avg"), ValueError, "'reduction'"),
    ]
    for kwargs, exc, match in cases:
        args = dict(x=x, weight=w, target=t)
        args.update(kwargs)
        with pytest.raises(exc, match=match):
            LCE(**args)
    out = torch.ops.aiayn.linear_cross_entropy_fwd(x, w, t, 0.0, -100, 0, False)
    bwd = torch.ops.aiayn.linear_cross_entropy_bwd
    with pytest.raises(ValueError, match="'grad_loss' must have target's shape"):
        bwd(torch.ones(5), None, x, w, t, out[2], 0.0, -100)
    with pytest.raises(TypeError, match="'grad_nll' has dtype"):
        bwd(torch.ones(6), torch.ones(6, dtype=torch.long), x, w, t, out[2], 0.0, -100)
    with pytest.raises(ValueError, match="'lse'"):
        bwd(torch.ones(6), None, x, w, t, out[2][:3], 0.0, -100)
    with pytest.raises(ValueError, match="reduction"):
        torch.ops.aiayn.linear_cross_entropy_fwd(x, w, t, 0.0, -100, 3, False)
    with pytest.raises(ValueError, match="compute_grad"):
        torch.ops.aiayn.linear_cross_entropy_fwd(x, w, t, 0.0, -100, 0, True)


def test_nan_inputs_propagate():
    x, w, t = make(6, 8, 10, torch.float32)
    x[2, 3] = float("nan")
    none = LCE(x, w, t, reduction="none")
    assert torch.isnan(none[2]) and torch.isfinite(none[[0, 1, 3, 4, 5]]).all()
    t[2] = -100  # an ignored NaN row counts for nothing, in the loss or the gradients
    xo, wo = leaves(x, w)
    loss = LCE(xo, wo, t)
    loss.backward()
    # dW gets 0 * NaN from the ignored row's x, as torch's dlogits^T x does.
    assert torch.isfinite(loss) and torch.equal(xo.grad[2], torch.zeros(8)) and torch.isfinite(xo.grad).all()


def test_build_registers_the_op():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("aiayn::linear_cross_entropy_fwd", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("aiayn::linear_cross_entropy_fwd", "CUDA")
    assert "linear_cross_entropy" in aiayn.functional.__all__
