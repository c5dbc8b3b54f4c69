"""add_dropout_layer_norm on the CPU: LayerNorm(residual + dropout(x)) (paper §3.1, §5.4).
Checked against the float64 reference with the 2x rule, on every ISA variant; gradients, exact
dropout, opcheck, torch.compile, odd shapes and strides, and the errors of bad calls."""

import pytest
import torch
import torch.nn.functional as F

import aiayn
from aiayn import functional as AF
from aiayn import reference
from conftest import assert_2x_rule

DTYPES = [torch.float32, torch.bfloat16]


def make_inputs(rows, cols, dtype, noncontig=False, wdtype=None, scale=1.0, offset=0.0):
    """Fresh random inputs; with noncontig, x and residual are column slices of wider tensors."""
    wide = cols + 5 if noncontig else cols
    x = (torch.randn(rows, wide) * scale + offset).to(dtype)[:, :cols]
    residual = (torch.randn(rows, wide) * scale - offset).to(dtype)[:, -cols:]
    w = (1 + 0.5 * torch.randn(cols)).to(wdtype or dtype)
    b = (0.5 * torch.randn(cols)).to(wdtype or dtype)
    if noncontig:
        assert not x.is_contiguous() and not residual.is_contiguous()
    return x, residual, w, b


def ref_and_torch(x, residual, w, b, p, mask, eps=1e-5):
    """(float64 reference, torch's own result in x's dtype) for the same dropout mask."""
    ref = reference.add_dropout_layer_norm(x.double(), residual.double(), w.double(), b.double(), p, eps, mask)
    theirs = reference.add_dropout_layer_norm(x, residual, w.to(x.dtype), b.to(x.dtype), p, eps, mask)
    return ref, theirs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 7), (3, 16), (5, 17), (17, 64), (64, 512), (2, 1000), (3, 4099)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_forward_matches_reference(isa, rng_seed, dtype, rows, cols, p):
    x, residual, w, b = make_inputs(rows, cols, dtype)
    out, mask = AF.add_dropout_layer_norm(x, residual, w, b, p=p, return_dropout_mask=True)
    assert out.dtype == dtype and out.shape == x.shape
    ref, theirs = ref_and_torch(x, residual, w, b, p, mask)
    assert_2x_rule(out, theirs, ref, f"fwd {isa} {dtype} {rows}x{cols} p={p}", seed=rng_seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_noncontiguous_and_batched_shapes(isa, rng_seed, dtype, p):
    x, residual, w, b = make_inputs(6 * 7, 33, dtype, noncontig=True)
    out, mask = AF.add_dropout_layer_norm(x, residual, w, b, p=p, return_dropout_mask=True)
    ref, theirs = ref_and_torch(x, residual, w, b, p, mask)
    assert_2x_rule(out, theirs, ref, "non-contiguous", seed=rng_seed)
    # A 3-d (B, L, D) input, and a transposed view whose last dim is not contiguous (copied).
    x3 = torch.randn(4, 9, 24, dtype=dtype).transpose(0, 1)
    r3 = torch.randn(9, 4, 24, dtype=dtype)
    out3, mask3 = AF.add_dropout_layer_norm(x3, r3, w[:24], b[:24], p=p, return_dropout_mask=True)
    ref3, theirs3 = ref_and_torch(x3, r3, w[:24], b[:24], p, mask3)
    assert_2x_rule(out3, theirs3, ref3, "3-d transposed", seed=rng_seed)
    xt = torch.randn(24, 10, dtype=dtype).t()  # last dim stride 10
    out_t = AF.add_dropout_layer_norm(xt, xt * 0.5, w[:24], b[:24])
    ref_t, theirs_t = ref_and_torch(xt, xt * 0.5, w[:24], b[:24], 0.0, None)
    assert_2x_rule(out_t, theirs_t, ref_t, "last dim strided", seed=rng_seed)


def test_float32_weights_with_bf16_activations_and_no_affine(isa, rng_seed):
    x, residual, w, b = make_inputs(7, 100, torch.bfloat16, wdtype=torch.float32)
    out = AF.add_dropout_layer_norm(x, residual, w, b)
    ref = F.layer_norm(x.double() + residual.double(), (100,), w.double(), b.double())
    theirs = F.layer_norm((x + residual).float(), (100,), w, b).to(torch.bfloat16)
    assert_2x_rule(out, theirs, ref, "fp32 affine", seed=rng_seed)
    out = AF.add_dropout_layer_norm(x, residual)
    ref = F.layer_norm(x.double() + residual.double(), (100,))
    theirs = F.layer_norm(x + residual, (100,))
    assert_2x_rule(out, theirs, ref, "no affine", seed=rng_seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_offset_and_scale(isa, rng_seed, dtype):
    # A large common offset makes a one-pass variance lose every digit; values around 1e4 too.
    x, residual, w, b = make_inputs(9, 300, dtype, scale=30.0, offset=1000.0)
    out = AF.add_dropout_layer_norm(x, residual, w, b)
    ref, theirs = ref_and_torch(x, residual, w, b, 0.0, None)
    assert_2x_rule(out, theirs, ref, "large offset", seed=rng_seed, slack=1e-5)


def test_constant_row_gives_bias_not_nan(isa):
    x = torch.full((2, 40), 3.25)
    out = AF.add_dropout_layer_norm(x, torch.full((2, 40), -1.5), torch.randn(40), b := torch.randn(40))
    assert torch.allclose(out, b.expand(2, 40))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("rows,cols", [(1, 5), (13, 64), (33, 515)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_backward_matches_reference(isa, rng_seed, dtype, rows, cols, p):
    x, residual, w, b = make_inputs(rows, cols, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, residual, w, b)]
    out, mask = AF.add_dropout_layer_norm(*leaves, p=p, return_dropout_mask=True)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, residual, w, b)]
    reference.add_dropout_layer_norm(*ref_leaves, p, 1e-5, mask).backward(grad.double())
    torch_leaves = [t.detach().clone().requires_grad_() for t in (x, residual, w, b)]
    reference.add_dropout_layer_norm(*torch_leaves, p, 1e-5, mask).backward(grad)
    for name, ours, r, t in zip(("x", "residual", "weight", "bias"), leaves, ref_leaves, torch_leaves):
        assert ours.grad.dtype == ours.dtype
        assert_2x_rule(ours.grad, t.grad, r.grad, f"grad {name} {isa} {dtype} {rows}x{cols} p={p}",
                       seed=rng_seed, slack=1e-5 if dtype != torch.float64 else 1e-10)


def test_gradcheck_float64(isa):
    x, residual, w, b = (t.requires_grad_() for t in make_inputs(4, 11, torch.float64))
    seed = torch.tensor([42], dtype=torch.int64)
    for p in (0.0, 0.4):
        fn = lambda x, r, w, b: AF.add_dropout_layer_norm(x, r, w, b, p=p, seed=seed)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, residual, w, b))
    assert torch.autograd.gradcheck(lambda x, r: AF.add_dropout_layer_norm(x, r), (x, residual))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_opcheck(dtype, p):
    x, residual, w, b = make_inputs(5, 19, dtype)
    args = (x.requires_grad_(), residual.requires_grad_(), w.requires_grad_(), b, p, 1e-5,
            torch.tensor([3], dtype=torch.int64))
    torch.library.opcheck(torch.ops.aiayn.add_dropout_layer_norm_fwd.default, args)
    torch.library.opcheck(torch.ops.aiayn.dropout_mask.default, (x.detach(), p, args[-1]))


def test_torch_compile_fullgraph(rng_seed):
    x, residual, w, b = make_inputs(8, 48, torch.float32)

    def f(x, r, w, b, seed):
        return AF.add_dropout_layer_norm(x * 2, r, w, b, p=0.25, seed=seed).relu()

    seed = torch.tensor([11], dtype=torch.int64)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, residual, w, b, seed), f(x, residual, w, b, seed))
    eager_default = torch.compile(lambda x, r: AF.add_dropout_layer_norm(x, r, p=0.1), fullgraph=True,
                                  backend="aot_eager")
    assert eager_default(x, residual).shape == x.shape


def test_dropout_is_exact_and_reproducible(isa):
    x, residual, w, b = make_inputs(37, 129, torch.float32)
    torch.manual_seed(0)
    out1, mask1 = AF.add_dropout_layer_norm(x, residual, w, b, p=0.5, return_dropout_mask=True)
    torch.manual_seed(0)
    out2, mask2 = AF.add_dropout_layer_norm(x, residual, w, b, p=0.5, return_dropout_mask=True)
    assert torch.equal(out1, out2) and torch.equal(mask1, mask2)
    out3, mask3 = AF.add_dropout_layer_norm(x, residual, w, b, p=0.5, return_dropout_mask=True)
    assert not torch.equal(mask1, mask3)
    assert 0.4 < mask1.float().mean().item() < 0.6
    # Exactly the reference for this mask (same float32 operations up to rounding of the sum).
    expected = reference.add_dropout_layer_norm(x.double(), residual.double(), w.double(), b.double(), 0.5, 1e-5, mask1)
    assert (out1.double() - expected).abs().max().item() < 1e-5
    # The ISA variants draw the same mask.
    seed = torch.tensor([123456789], dtype=torch.int64)
    outs = []
    for name in ("avx512", "avx2", "generic"):
        if aiayn._C.cpu_isa_supported(name):
            with aiayn.cpu_isa(name):
                outs.append(AF.add_dropout_layer_norm(x, residual, w, b, p=0.3, seed=seed))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)


def test_no_dropout_when_not_training_or_p_zero():
    x, residual, w, b = make_inputs(4, 32, torch.float32)
    state = torch.get_rng_state()
    a = AF.add_dropout_layer_norm(x, residual, w, b, p=0.7, training=False)
    c = AF.add_dropout_layer_norm(x, residual, w, b, p=0.0)
    assert torch.equal(state, torch.get_rng_state()), "p == 0 must not draw random numbers"
    torch.testing.assert_close(a, F.layer_norm(x + residual, (32,), w, b))
    torch.testing.assert_close(c, a)
    full = AF.add_dropout_layer_norm(x, residual, w, b, p=1.0)
    torch.testing.assert_close(full, F.layer_norm(residual, (32,), w, b))


def test_empty_inputs():
    w, b = torch.randn(8), torch.randn(8)
    out = AF.add_dropout_layer_norm(torch.empty(0, 8), torch.empty(0, 8), w, b, p=0.1)
    assert out.shape == (0, 8)
    x = torch.empty(0, 8, requires_grad=True)
    AF.add_dropout_layer_norm(x, torch.empty(0, 8), w.requires_grad_(), b).sum().backward()
    assert x.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros(8))


def test_nan_propagates_not_crashes():
    x, residual, w, b = make_inputs(3, 20, torch.float32)
    x[1, 4] = float("nan")
    out = AF.add_dropout_layer_norm(x, residual, w, b)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any() and not torch.isnan(out[2]).any()


def test_bad_inputs_name_the_argument():
    x, residual, w, b = make_inputs(4, 16, torch.float32)
    op = AF.add_dropout_layer_norm
    with pytest.raises(ValueError, match="'residual'.*shape"):
        op(x, residual[:, :8], w, b)
    with pytest.raises(TypeError, match="'residual'.*dtype"):
        op(x, residual.double(), w, b)
    with pytest.raises(ValueError, match="'weight'.*shape"):
        op(x, residual, w[:8], b)
    with pytest.raises(ValueError, match="'bias'.*shape"):
        op(x, residual, w, b.reshape(4, 4))
    with pytest.raises(TypeError, match="'weight'.*dtype"):
        op(x, residual, w.double(), b)
    with pytest.raises(TypeError, match="'x'.*dtype"):
        op(x.to(torch.int32), residual.to(torch.int32), w, b)
    with pytest.raises(TypeError, match="'x'.*dtype"):
        op(x.half(), residual.half(), w, b)  # float16 is CUDA-only
    with pytest.raises(ValueError, match="'p'"):
        op(x, residual, w, b, p=-0.1)
    with pytest.raises(ValueError, match="'p'"):
        op(x, residual, w, b, p=1.5)
    with pytest.raises(ValueError, match="'eps'"):
        op(x, residual, w, b, eps=-1.0)
    with pytest.raises(ValueError, match="'x'.*dimension"):
        op(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(TypeError, match="'seed'"):
        op(x, residual, w, b, p=0.5, seed=torch.tensor([1.5]))
    with pytest.raises(ValueError, match="'grad_out'"):
        torch.ops.aiayn.add_dropout_layer_norm_bwd(x[:2], x, residual, w, torch.zeros(4), torch.ones(4), 0.0,
                                                   torch.tensor([0]))
    with pytest.raises(ValueError, match="'mean'"):
        torch.ops.aiayn.add_dropout_layer_norm_bwd(x, x, residual, w, torch.zeros(3), torch.ones(3), 0.0,
                                                   torch.tensor([0]))
