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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for a second device")
def test_mixed_devices_name_the_argument():
    x = torch.randn(3, 8, device="cuda")
    with pytest.raises(RuntimeError, match="'residual' is on"):
        ADLN(x, torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="'weight' is on"):
        ADLN(x, x, torch.randn(8))
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
        jobs.append((x, r, w, b, q, k, v, pad, seed))

    def run(job):
        x, r, w, b, q, k, v, pad, seed = job
        xs = x.clone().requires_grad_()
        y = ADLN(xs, r, w, b, p=0.2, seed=seed)
        y.pow(2).sum().backward()
        qs = q.clone().requires_grad_()
        o = SDPA(qs, k, v, key_padding_mask=pad, dropout_p=0.1, is_causal=True, seed=seed)
        o.pow(2).sum().backward()
        return [y.detach(), xs.grad, o.detach(), qs.grad, AF.dropout_mask(x, 0.3, seed)]

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
