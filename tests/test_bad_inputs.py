"""The bad-input matrix: for each op and each argument, a wrong rank, size or dtype ends in a
Python exception naming the argument; strided inputs, NaN/Inf and empty tensors give their
documented results; sizes no process could allocate are refused before allocating; and the ops
called from several threads at once give the serial results."""

import threading

import pytest
import torch

from aiayn import functional as AF
from aiayn import reference
from conftest import isa  # noqa: F401 -- the ISA-variant fixture

ADLN = AF.add_dropout_layer_norm
SDPA = AF.scaled_dot_product_attention
LIN = AF.linear
FFN = AF.feed_forward


def huge(shape, dtype=torch.float32):
    """A tensor of a huge logical shape backed by one element (stride 0 everywhere)."""
    return torch.zeros((1,) * len(shape), dtype=dtype).expand(shape)


# --- add_dropout_layer_norm -----------------------------------------------------------------

def adln_args():
    return dict(x=torch.randn(3, 5, 8), residual=torch.randn(3, 5, 8), weight=torch.randn(8), bias=torch.randn(8))


@pytest.mark.parametrize("arg,value,exc,match", [
    ("x", torch.randn(()), ValueError, "'x' must have at least one dimension"),
    ("residual", torch.randn(3, 8), ValueError, "'residual' has shape"),
    ("residual", torch.randn(3, 5, 9), ValueError, "'residual' has shape"),
    ("weight", torch.randn(8, 1), ValueError, "'weight' must have shape"),
    ("weight", torch.randn(9), ValueError, "'weight' must have shape"),
    ("bias", torch.randn(1, 8), ValueError, "'bias' must have shape"),
    ("bias", torch.randn(7), ValueError, "'bias' must have shape"),
    ("x", torch.randn(3, 5, 8).half(), TypeError, "'x' has dtype"),
    ("x", torch.ones(3, 5, 8, dtype=torch.int32), TypeError, "'x' has dtype"),
    ("residual", torch.randn(3, 5, 8).double(), TypeError, "'residual' has dtype"),
    ("weight", torch.randn(8).double(), TypeError, "'weight' has dtype"),
    ("bias", torch.randn(8).bfloat16(), TypeError, "'bias' has dtype"),
    ("x", None, (ValueError, RuntimeError, TypeError), "x"),
    ("residual", None, (ValueError, RuntimeError, TypeError), "residual"),
])
def test_add_dropout_layer_norm_bad_arguments(arg, value, exc, match):
    kw = adln_args()
    kw[arg] = value
    with pytest.raises(exc, match=match):
        ADLN(kw["x"], kw["residual"], kw["weight"], kw["bias"])


@pytest.mark.parametrize("kw,match", [(dict(p=-0.1), "'p'"), (dict(p=1.5), "'p'"), (dict(p=float("nan")), "'p'"),
                                      (dict(eps=-1.0), "'eps'")])
def test_add_dropout_layer_norm_bad_scalars(kw, match):
    a = adln_args()
    with pytest.raises(ValueError, match=match):
        ADLN(a["x"], a["residual"], a["weight"], a["bias"], **kw)


@pytest.mark.parametrize("bad", [torch.tensor([1, 2]), torch.tensor([1.0]), torch.tensor([], dtype=torch.int64)])
def test_bad_seed(bad):
    a = adln_args()
    with pytest.raises((ValueError, TypeError), match="'seed'"):
        ADLN(a["x"], a["residual"], p=0.5, seed=bad)
    with pytest.raises((ValueError, TypeError), match="'seed'"):
        AF.dropout_mask(a["x"], 0.5, bad)
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises((ValueError, TypeError), match="'seed'"):
        SDPA(q, q, q, dropout_p=0.5, seed=bad)


def test_add_dropout_layer_norm_strided_last_dim_is_accepted():
    x = torch.randn(4, 8, 6).transpose(1, 2)  # last dim stride 6
    r = torch.randn(4, 16, 6)[:, ::2].transpose(1, 2)
    w, b = torch.randn(8), torch.randn(8)
    assert x.stride(-1) != 1 and r.stride(-1) != 1
    torch.testing.assert_close(ADLN(x, r, w, b), ADLN(x.contiguous(), r.contiguous(), w, b))
    ws = torch.randn(16)  # a strided weight is accepted too
    torch.testing.assert_close(ADLN(x, r, ws[::2], b), ADLN(x, r, ws[::2].contiguous(), b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_add_dropout_layer_norm_nan_inf_propagate(dtype):
    x, r = torch.randn(4, 16, dtype=dtype), torch.randn(4, 16, dtype=dtype)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    r[3, 0] = float("-inf")
    out = ADLN(x, r, p=0.0)
    assert torch.isnan(out[1:]).all(), "a NaN or Inf in a row makes its whole row NaN (as torch's layer_norm)"
    assert torch.isfinite(out[0]).all()
    ref = torch.nn.functional.layer_norm((x + r).double(), (16,))
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    xr = x.clone().requires_grad_()
    ADLN(xr, r).sum().backward()
    assert torch.isfinite(xr.grad[0]).all()


@pytest.mark.parametrize("shape", [(0, 8), (0, 3, 8), (3, 0, 8), (5, 0)])
def test_add_dropout_layer_norm_empty(shape):
    x, r = torch.randn(shape).requires_grad_(), torch.randn(shape).requires_grad_()
    w, b = torch.randn(shape[-1]).requires_grad_(), torch.randn(shape[-1]).requires_grad_()
    out = ADLN(x, r, w, b, p=0.3)
    assert out.shape == shape  # documented: an empty result of x's shape
    out.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_add_dropout_layer_norm_huge_is_refused_before_allocating():
    x = huge((2**40, 2**20))  # 2^60 elements: 4 EiB of output
    with pytest.raises(ValueError, match="'x' .*too large"):
        ADLN(x, x)
    with pytest.raises(ValueError, match="'like' .*too large"):
        AF.dropout_mask(x, 0.5, torch.tensor([1]))


# --- dropout_mask ---------------------------------------------------------------------------

def test_dropout_mask_bad_arguments():
    like = torch.randn(3, 4)
    with pytest.raises(ValueError, match="'p'"):
        AF.dropout_mask(like, 1.5, torch.tensor([1]))
    with pytest.raises(ValueError, match="'p'"):
        AF.dropout_mask(like, -0.5, torch.tensor([1]))
    with pytest.raises((ValueError, TypeError, RuntimeError), match="like"):
        AF.dropout_mask(None, 0.5, torch.tensor([1]))


def test_dropout_mask_any_dtype_layout_and_empty():
    seed = torch.tensor([123])
    for like in (torch.empty(5, 7, dtype=torch.int8), torch.empty(7, 5).t(), torch.empty(0, 3), torch.empty(()),
                 torch.empty(1).expand(4, 9)):
        m = AF.dropout_mask(like, 0.4, seed)
        assert m.shape == like.shape and m.dtype == torch.bool
        assert torch.equal(m, reference.dropout_mask(tuple(like.shape), 0.4, seed))


# --- scaled_dot_product_attention -------------------------------------------------------------

def sdpa_args(B=2, H=2, Lq=5, Lk=6, D=8):
    return dict(q=torch.randn(B, H, Lq, D), k=torch.randn(B, H, Lk, D), v=torch.randn(B, H, Lk, D))


@pytest.mark.parametrize("arg,value,exc,match", [
    ("q", torch.randn(2, 5, 8), ValueError, "'q' must be 4-D"),
    ("k", torch.randn(2, 2, 2, 6, 8), ValueError, "'k' must be 4-D"),
    ("v", torch.randn(6, 8), ValueError, "'v' must be 4-D"),
    ("k", torch.randn(2, 2, 6, 4), ValueError, "'k' must have head_dim"),
    ("v", torch.randn(2, 2, 7, 8), ValueError, "'v' must have length"),
    ("v", torch.randn(2, 2, 6, 4), ValueError, "'v' must have head_dim"),
    ("k", torch.randn(1, 2, 6, 8), ValueError, "'q', 'k', 'v' must have the same batch"),
    ("v", torch.randn(2, 3, 6, 8), ValueError, "'q', 'k', 'v' must have the same batch"),
    ("q", torch.randn(2, 2, 5, 8).half(), TypeError, "'q' has dtype"),
    ("q", torch.ones(2, 2, 5, 8, dtype=torch.int64), TypeError, "'q' has dtype"),
    ("k", torch.randn(2, 2, 6, 8).double(), TypeError, "'k' has dtype"),
    ("v", torch.randn(2, 2, 6, 8).bfloat16(), TypeError, "'v' has dtype"),
    ("q", torch.randn(2, 2, 5, 300), ValueError, "head_dim"),
])
def test_attention_bad_tensors(arg, value, exc, match):
    kw = sdpa_args()
    kw[arg] = value
    if arg == "q" and value.shape[-1] == 300:
        kw["k"] = kw["v"] = torch.randn(2, 2, 6, 300)
    with pytest.raises(exc, match=match):
        SDPA(kw["q"], kw["k"], kw["v"])


@pytest.mark.parametrize("kw,exc,match", [
    (dict(attn_mask=torch.ones(5, 5, dtype=torch.bool)), ValueError, "'attn_mask'.*not broadcastable"),
    (dict(attn_mask=torch.ones(3, 2, 5, 6, dtype=torch.bool)), ValueError, "'attn_mask'.*not broadcastable"),
    (dict(attn_mask=torch.ones(1, 2, 2, 5, 6, dtype=torch.bool)), ValueError, "'attn_mask'.*not broadcastable"),
    (dict(attn_mask=torch.ones(5, 6, dtype=torch.int32)), TypeError, "'attn_mask'"),
    (dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError, "'key_padding_mask'"),
    (dict(key_padding_mask=torch.zeros(6, dtype=torch.bool)), ValueError, "'key_padding_mask'"),
    (dict(key_padding_mask=torch.zeros(2, 6)), TypeError, "'key_padding_mask'"),
    (dict(dropout_p=1.5), ValueError, "'dropout_p'"),
    (dict(dropout_p=-1e-3), ValueError, "'dropout_p'"),
    (dict(scale=float("nan")), ValueError, "'scale'"),
    (dict(scale=float("inf")), ValueError, "'scale'"),
])
def test_attention_bad_options(kw, exc, match):
    a = sdpa_args()
    with pytest.raises(exc, match=match):
        SDPA(a["q"], a["k"], a["v"], **kw)


def test_attention_strided_last_dim_and_masks_are_accepted():
    a = sdpa_args(Lq=6)
    q = torch.randn(2, 2, 8, 6).transpose(-1, -2)
    k = a["k"].transpose(0, 1).contiguous().transpose(0, 1)
    mask = (torch.rand(6, 12) < 0.8)[:, ::2]  # strided last dim
    pad = (torch.rand(6, 2) < 0.2).t()        # (B, Lk) transposed view
    pad[:, 0] = False
    want = SDPA(q.contiguous(), k.contiguous(), a["v"], attn_mask=mask.contiguous(), key_padding_mask=pad.contiguous())
    torch.testing.assert_close(SDPA(q, k, a["v"], attn_mask=mask, key_padding_mask=pad), want)
    fmask = torch.randn(6, 12)[:, ::2]
    torch.testing.assert_close(SDPA(q, k, a["v"], attn_mask=fmask), SDPA(q, k, a["v"], attn_mask=fmask.contiguous()))


@pytest.mark.parametrize("Lq", [3, 70])  # the decode path (<= 4 rows) and the blocked one
@pytest.mark.parametrize("where", ["q", "k", "v", "k_inf", "mask"])
def test_attention_nan_inf_propagate(isa, Lq, where):
    """A NaN or Inf input gives NaN exactly where torch's math gives NaN (it used to vanish: the
    exp2 clamp turned NaN into 0 and a row of NaN scores counted as fully masked)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, Lq, 8), torch.randn(2, 2, 70, 8), torch.randn(2, 2, 70, 8)
    mask = None
    if where == "q":
        q[0, 1, 1, 2] = float("nan")
    elif where == "k":
        k[1, 0, 5, 3] = float("nan")
    elif where == "v":
        v[0, 0, 2, 3] = float("nan")
    elif where == "k_inf":
        k[1, 1, 4, 0] = float("inf")
        q[1, 1, 0, 0], q[1, 1, 1, 0] = 1.0, -1.0  # a score of +inf (NaN row) and one of -inf (key ignored)
    else:
        mask = torch.zeros(Lq, 70)
        mask[2, 1] = float("nan")
    out = SDPA(q, k, v, attn_mask=mask)
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    assert torch.isnan(ref).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    torch.testing.assert_close(out[ok].double(), ref[ok], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B,H,Lq,Lk", [(0, 2, 5, 6), (2, 0, 5, 6), (2, 2, 0, 6), (2, 2, 5, 0), (2, 2, 0, 0)])
def test_attention_empty(B, H, Lq, Lk):
    q, k, v = (t.requires_grad_() for t in sdpa_args(B, H, Lq, Lk).values())
    out = SDPA(q, k, v, dropout_p=0.2, is_causal=True)
    assert out.shape == (B, H, Lq, 8)
    assert torch.equal(out, torch.zeros_like(out)), "no keys: zeros (documented); empty otherwise"
    out.sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_attention_huge_is_refused_before_allocating():
    q = huge((1, 1, 2**50, 256))  # 2^58 elements
    k = torch.randn(1, 1, 4, 256)
    with pytest.raises(ValueError, match="'q' .*too large"):
        SDPA(q, k, k)
    # q, k, v themselves small enough, but 2^33 * 2^33 * 2^2 scores overflow the int64 numbering.
    q, k = huge((4, 1, 2**33, 1)), huge((4, 1, 2**33, 1))
    with pytest.raises(ValueError, match="'q' and 'k'.*int64"):
        SDPA(q, k, k)


# --- linear ---------------------------------------------------------------------------------

def linear_args(tokens=5, K=8, N=6):
    return dict(x=torch.randn(3, tokens, K), w=torch.randn(N, K), b=torch.randn(N))


@pytest.mark.parametrize("arg,value,exc,match", [
    ("x", torch.randn(()), ValueError, "'x' must have at least one dimension"),
    ("x", torch.randn(3, 5, 9), ValueError, "'w' must have shape"),  # in_features mismatch
    ("w", torch.randn(8), ValueError, "'w' must have shape"),
    ("w", torch.randn(1, 6, 8), ValueError, "'w' must have shape"),
    ("w", torch.randn(6, 7), ValueError, "'w' must have shape"),
    ("b", torch.randn(1, 6), ValueError, "'b' must have shape"),
    ("b", torch.randn(7), ValueError, "'b' must have shape"),
    ("b", torch.randn(()), ValueError, "'b' must have shape"),
    ("x", torch.randn(3, 5, 8).half(), TypeError, "'x' has dtype"),
    ("x", torch.ones(3, 5, 8, dtype=torch.int32), TypeError, "'x' has dtype"),
    ("w", torch.randn(6, 8).double(), TypeError, "'w' has dtype"),
    ("w", torch.randn(6, 8).bfloat16(), TypeError, "'w' has dtype"),
    ("b", torch.randn(6).double(), TypeError, "'b' has dtype"),
    ("x", None, (ValueError, RuntimeError, TypeError, AttributeError), "x|device"),
    ("w", None, (ValueError, RuntimeError, TypeError), "w"),
])
def test_linear_bad_arguments(arg, value, exc, match):
    kw = linear_args()
    kw[arg] = value
    with pytest.raises(exc, match=match):
        LIN(kw["x"], kw["w"], kw["b"])


@pytest.mark.parametrize("activation", ["gelu", "RELU", "", "none", 1])
def test_linear_bad_activation(activation):
    a = linear_args()
    with pytest.raises(ValueError, match="'activation'"):
        LIN(a["x"], a["w"], a["b"], activation=activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("where", ["x_nan", "x_inf", "w_nan", "w_inf", "b_nan", "b_inf"])
def test_linear_nan_inf_propagate(isa, dtype, activation, where):
    """A NaN or Inf gives NaN and Inf exactly where the float64 reference does (the ReLU included:
    relu(NaN) is NaN, relu(-inf) is 0)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(37, 19), torch.randn(21, 19), torch.randn(21)
    t, val = {"x": (x, (5, 3)), "w": (w, (4, 7)), "b": (b, (9,))}[where[0]], where[2:]
    t[0][t[1]] = float("nan") if val == "nan" else float("inf")
    if where[0] == "x":
        x[11, 2] = float("-inf")
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    out = LIN(x, w, b, activation)
    ref = reference.linear(x.double(), w.double(), b.double(), activation)
    assert torch.isnan(ref).any() or torch.isinf(ref).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN where the reference has NaN"
    assert torch.equal(torch.isinf(out), torch.isinf(ref)), "Inf where the reference has Inf"
    assert torch.equal(torch.signbit(out[torch.isinf(ref)]), torch.signbit(ref[torch.isinf(ref)]))


@pytest.mark.parametrize("x_shape,N", [((0, 8), 6), ((3, 0, 8), 6), ((0,), 6), ((4, 8), 0), ((4, 0), 6)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_linear_empty(x_shape, N, activation):
    x = torch.randn(x_shape).requires_grad_()
    w = torch.randn(N, x_shape[-1]).requires_grad_()
    b = torch.randn(N).requires_grad_()
    out = LIN(x, w, b, activation)
    assert out.shape == x_shape[:-1] + (N,)
    torch.testing.assert_close(out, reference.linear(x.detach(), w.detach(), b.detach(), activation))
    out.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    if x.numel() == 0 and x.shape[-1] != 0 or N == 0:
        assert torch.equal(w.grad, torch.zeros_like(w))
    want_db = out.new_ones(out.shape).gt(0) if activation is None else (out > 0)
    torch.testing.assert_close(b.grad, want_db.float().reshape(-1, N).sum(0) if N else torch.zeros(0))


def test_linear_huge_is_refused_before_allocating():
    with pytest.raises(ValueError, match="'x' .*too large"):
        LIN(huge((2**40, 2**20)), torch.randn(4, 2**20))
    # x itself small enough (2^43 elements), but its 2^40 x 1024 result is not.
    with pytest.raises(ValueError, match="'x' and 'w'.*too large"):
        LIN(huge((2**40, 8)), torch.randn(1024, 8))
    with pytest.raises(ValueError, match="'x' and 'w'.*too large"):
        LIN(huge((2**22, 2**22, 1)), huge((2**20, 1)))  # tokens * N = 2^64 would overflow int64


# --- feed_forward ---------------------------------------------------------------------------

def ffn_args(d_model=8, d_ff=12):
    return dict(x=torch.randn(3, 5, d_model), w1=torch.randn(d_ff, d_model), b1=torch.randn(d_ff),
                w2=torch.randn(d_model, d_ff), b2=torch.randn(d_model))


def call_ffn(kw, **opts):
    return FFN(kw["x"], kw["w1"], kw["b1"], kw["w2"], kw["b2"], **opts)


@pytest.mark.parametrize("arg,value,exc,match", [
    ("x", torch.randn(()), ValueError, "'x' must have at least one dimension"),
    ("x", torch.randn(3, 5, 9), ValueError, "'w1' must have shape"),  # d_model mismatch
    ("w1", torch.randn(12), ValueError, "'w1' must have shape"),
    ("w1", torch.randn(1, 12, 8), ValueError, "'w1' must have shape"),
    ("w1", torch.randn(12, 9), ValueError, "'w1' must have shape"),
    ("w1", torch.randn(13, 8), ValueError, "'w2' must have shape"),  # d_ff mismatch with w2
    ("b1", torch.randn(1, 12), ValueError, "'b1' must have shape"),
    ("b1", torch.randn(11), ValueError, "'b1' must have shape"),
    ("w2", torch.randn(8), ValueError, "'w2' must have shape"),
    ("w2", torch.randn(1, 8, 12), ValueError, "'w2' must have shape"),
    ("w2", torch.randn(9, 12), ValueError, "'w2' must have shape"),
    ("w2", torch.randn(8, 11), ValueError, "'w2' must have shape"),
    ("w2", torch.randn(12, 8), ValueError, "'w2' must have shape"),  # w1's layout
    ("b2", torch.randn(8, 1), ValueError, "'b2' must have shape"),
    ("b2", torch.randn(12), ValueError, "'b2' must have shape"),
    ("x", torch.randn(3, 5, 8).half(), TypeError, "'x' has dtype"),
    ("x", torch.ones(3, 5, 8, dtype=torch.int64), TypeError, "'x' has dtype"),
    ("w1", torch.randn(12, 8).double(), TypeError, "'w1' has dtype"),
    ("b1", torch.randn(12).bfloat16(), TypeError, "'b1' has dtype"),
    ("w2", torch.randn(8, 12).bfloat16(), TypeError, "'w2' has dtype"),
    ("b2", torch.randn(8).double(), TypeError, "'b2' has dtype"),
    ("x", None, (ValueError, RuntimeError, TypeError, AttributeError), "x|device"),
    ("w1", None, (ValueError, RuntimeError, TypeError), "w1"),
    ("w2", None, (ValueError, RuntimeError, TypeError), "w2"),
])
def test_feed_forward_bad_arguments(arg, value, exc, match):
    kw = ffn_args()
    kw[arg] = value
    with pytest.raises(exc, match=match):
        call_ffn(kw)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), float("inf")])
def test_feed_forward_bad_dropout_p(p):
    with pytest.raises(ValueError, match="'dropout_p'"):
        call_ffn(ffn_args(), dropout_p=p)
    with pytest.raises(ValueError, match="'p'"):  # the op itself checks too
        a = ffn_args()
        torch.ops.aiayn.feed_forward_fwd(a["x"], a["w1"], a["b1"], a["w2"], a["b2"], p, torch.tensor([0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("where", ["x_nan", "x_inf", "w1_nan", "b1_nan", "b1_inf", "w2_nan", "w2_inf", "b2_nan"])
def test_feed_forward_nan_inf_propagate(isa, dtype, where):
    """NaN and Inf where the float64 reference has them: through both GEMMs and the ReLU between
    (relu(NaN) is NaN; a -inf hidden pre-activation is cut to 0 by the ReLU)."""
    torch.manual_seed(0)
    a = ffn_args(d_model=19, d_ff=23)
    a["x"] = torch.randn(3, 13, 19)
    name, val = where.rsplit("_", 1)
    t = a[name]
    t.view(-1)[t.numel() // 3] = float("nan") if val == "nan" else float("inf")
    if name == "x":
        a["x"][2, 4, 5] = float("-inf")
    a = {k: v.to(dtype) for k, v in a.items()}
    out = call_ffn(a)
    ref = reference.feed_forward(*(a[k].double() for k in ("x", "w1", "b1", "w2", "b2")))
    assert torch.isnan(ref).any() or torch.isinf(ref).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN where the reference has NaN"
    assert torch.equal(torch.isinf(out), torch.isinf(ref)), "Inf where the reference has Inf"


@pytest.mark.parametrize("x_shape,d_ff", [((0, 8), 12), ((3, 0, 8), 12), ((0,), 12), ((4, 8), 0), ((4, 0), 12)])
def test_feed_forward_empty(x_shape, d_ff):
    D = x_shape[-1]
    x = torch.randn(x_shape).requires_grad_()
    w1, b1, w2, b2 = (torch.randn(s).requires_grad_() for s in ((d_ff, D), (d_ff,), (D, d_ff), (D,)))
    out, mask = FFN(x, w1, b1, w2, b2, dropout_p=0.3, seed=torch.tensor([5]), return_dropout_mask=True)
    assert out.shape == x_shape and mask.shape == x_shape[:-1] + (d_ff,)
    torch.testing.assert_close(out, reference.feed_forward(x.detach(), w1.detach(), b1.detach(), w2.detach(),
                                                           b2.detach(), 0.3, mask))
    out.sum().backward()
    for t in (x, w1, b1, w2, b2):
        assert t.grad.shape == t.shape and torch.isfinite(t.grad).all()
    if x.numel() == 0:
        for t in (w1, b1, w2):
            assert torch.equal(t.grad, torch.zeros_like(t))


def test_feed_forward_huge_is_refused_before_allocating():
    w1, w2 = torch.randn(4, 2**20), torch.randn(2**20, 4)
    with pytest.raises(ValueError, match="'x' .*too large"):
        FFN(huge((2**40, 2**20)), w1, None, w2, None)
    # x itself small enough (2^43 elements), but the (2^40, 1024) hidden activation is not.
    with pytest.raises(ValueError, match="'x' and 'w1'.*too large"):
        FFN(huge((2**40, 8)), torch.randn(1024, 8), None, torch.randn(8, 1024), None)
    with pytest.raises(ValueError, match="'x' and 'w1'.*too large"):
        FFN(huge((2**22, 2**22, 1)), huge((2**20, 1)), None, huge((1, 2**20)), None, dropout_p=0.5)


def test_linear_and_feed_forward_backward_ops_bad_arguments():
    x, w = torch.randn(3, 8), torch.randn(6, 8)
    out = torch.ops.aiayn.linear_fwd(x, w, None, True)
    with pytest.raises(ValueError, match="'grad_out' must have shape"):
        torch.ops.aiayn.linear_bwd(out[:, :5], x, w, out, True)
    with pytest.raises(TypeError, match="'grad_out' has dtype"):
        torch.ops.aiayn.linear_bwd(out.double(), x, w, out, True)
    with pytest.raises(ValueError, match="'out'"):
        torch.ops.aiayn.linear_bwd(out, x, w, None, True)
    a = ffn_args()
    y, hidden, _ = torch.ops.aiayn.feed_forward_fwd(a["x"], a["w1"], a["b1"], a["w2"], a["b2"], 0.0, torch.tensor([0]))
    bwd = torch.ops.aiayn.feed_forward_bwd
    with pytest.raises(ValueError, match="'grad_out' has shape"):
        bwd(y[:2], a["x"], a["w1"], a["w2"], hidden, 0.0)
    with pytest.raises(TypeError, match="'grad_out' has dtype"):
        bwd(y.double(), a["x"], a["w1"], a["w2"], hidden, 0.0)
    with pytest.raises(ValueError, match="'hidden' must have shape"):
        bwd(y, a["x"], a["w1"], a["w2"], hidden[..., :5], 0.0)
    with pytest.raises(TypeError, match="'hidden' has dtype"):
        bwd(y, a["x"], a["w1"], a["w2"], hidden.double(), 0.0)
    with pytest.raises(ValueError, match="'relu_mask' must be a uint8 tensor of shape"):
        bwd(y, a["x"], a["w1"], a["w2"], hidden, 0.0, torch.ones(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="'relu_mask' must be a uint8 tensor of shape"):
        bwd(y, a["x"], a["w1"], a["w2"], hidden, 0.0, torch.ones(*hidden.shape[:-1], 16))


# --- the backward ops' own arguments, and mixed devices ------------------------------------------

def test_backward_ops_bad_arguments():
    x, r, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    seed = torch.tensor([1])
    out, mean, rstd = torch.ops.aiayn.add_dropout_layer_norm_fwd(x, r, w, None, 0.0, 1e-5, seed)
    bwd = torch.ops.aiayn.add_dropout_layer_norm_bwd
    with pytest.raises(ValueError, match="'grad_out' has shape"):
        bwd(torch.randn(3, 9), x, r, w, mean, rstd, 0.0, seed)
    with pytest.raises(TypeError, match="'grad_out' has dtype"):
        bwd(torch.randn(3, 8).double(), x, r, w, mean, rstd, 0.0, seed)
    with pytest.raises(ValueError, match="'mean' and 'rstd'"):
        bwd(out, x, r, w, mean[:2], rstd, 0.0, seed)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8)
    o, lse = torch.ops.aiayn.attention_fwd(q, k, k, None, None, 0.0, False, 0.3, seed)
    abwd = torch.ops.aiayn.attention_bwd
    with pytest.raises(ValueError, match="'grad_out' has shape"):
        abwd(o[:, :, :4], q, k, k, o, lse, None, None, 0.0, False, 0.3, seed)
    with pytest.raises(TypeError, match="'grad_out' has dtype"):
        abwd(o.double(), q, k, k, o, lse, None, None, 0.0, False, 0.3, seed)
    with pytest.raises(ValueError, match="'out' has shape"):
        abwd(o, q, k, k, o[..., :4], lse, None, None, 0.0, False, 0.3, seed)
    with pytest.raises(ValueError, match="'lse'"):
        abwd(o, q, k, k, o, lse[..., :4], None, None, 0.0, False, 0.3, seed)
    # out: q's dtype, or float32 only for a bfloat16 q (the forward's float_out)
    with pytest.raises(TypeError, match="'out' must have q's dtype Float, got Double"):
        abwd(o, q, k, k, o.double(), lse, None, None, 0.0, False, 0.3, seed)
    qb, kb = q.bfloat16(), k.bfloat16()
    with pytest.raises(TypeError, match="'out' must have q's dtype BFloat16 or float32, got Double"):
        abwd(o.bfloat16(), qb, kb, kb, o.double(), lse, None, None, 0.0, False, 0.3, seed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for a second device")
def test_mixed_devices_name_the_argument():
    x = torch.randn(3, 8, device="cuda")
    with pytest.raises(RuntimeError, match="'residual' is on"):
        ADLN(x, torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="'weight' is on"):
        ADLN(x, x, torch.randn(8))
    with pytest.raises((ValueError, RuntimeError), match="'w' is on"):
        LIN(x, torch.randn(4, 8))
    with pytest.raises((ValueError, RuntimeError), match="'b2' is on"):
        FFN(x, torch.randn(4, 8, device="cuda"), None, torch.randn(8, 4, device="cuda"), torch.randn(8))
    q = torch.randn(1, 1, 4, 8)
    # (no CUDA attention kernel yet, issue 7: the dispatcher may refuse the CUDA backend instead)
    with pytest.raises((RuntimeError, NotImplementedError), match="'k' is on|'q' is on|CUDA"):
        SDPA(q, q.cuda(), q)


# --- several threads at once ----------------------------------------------------------------

def test_ops_from_several_threads_match_serial():
    torch.manual_seed(0)
    jobs = []
    for i in range(4):
        x, r, w, b = torch.randn(33 + i, 70), torch.randn(33 + i, 70), torch.randn(70), torch.randn(70)
        q, k, v = torch.randn(2, 2, 40 + i, 24), torch.randn(2, 2, 50, 24), torch.randn(2, 2, 50, 24)
        pad = torch.rand(2, 50) < 0.2
        seed = torch.tensor([1000 + i])
        lw, lb = torch.randn(45 + i, 70), torch.randn(45 + i)
        w1, b1, w2, b2 = torch.randn(130 + i, 70) / 8, torch.randn(130 + i), torch.randn(70, 130 + i) / 11, None
        jobs.append((x, r, w, b, q, k, v, pad, seed, lw, lb, w1, b1, w2, b2))

    def run(job):
        x, r, w, b, q, k, v, pad, seed, lw, lb, w1, b1, w2, b2 = job
        xs = x.clone().requires_grad_()
        y = ADLN(xs, r, w, b, p=0.2, seed=seed)
        y.pow(2).sum().backward()
        qs = q.clone().requires_grad_()
        o = SDPA(qs, k, v, key_padding_mask=pad, dropout_p=0.1, is_causal=True, seed=seed)
        o.pow(2).sum().backward()
        xl, lws = x.clone().requires_grad_(), lw.clone().requires_grad_()
        lo = LIN(xl, lws, lb, "relu")
        lo.pow(2).sum().backward()
        xf, w1s = x.clone().requires_grad_(), w1.clone().requires_grad_()
        f = FFN(xf, w1s, b1, w2, b2, dropout_p=0.2, seed=seed)
        f.pow(2).sum().backward()
        return [y.detach(), xs.grad, o.detach(), qs.grad, AF.dropout_mask(x, 0.3, seed),
                lo.detach(), xl.grad, lws.grad, f.detach(), xf.grad, w1s.grad]

    serial = [run(j) for j in jobs]
    results = [None] * len(jobs)
    errors = []
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        try:
            barrier.wait()
            for _ in range(3):
                results[i] = run(jobs[i])
                for a, b in zip(results[i], serial[i]):
                    assert torch.equal(a, b), f"thread {i} differs from the serial result"
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
