"""linear_int8 on the CPU (inference only): bit for bit the integer reference on every ISA (the
int32 sums are exact, and the dequantizing epilogue does the reference's float32 operations in
its order), odd shapes, strides, zero / non-finite rows, extreme values, the error bound against
float32, opcheck and the argument errors."""

import pytest
import torch

from aiayn import functional as AF
from aiayn import reference
from conftest import ISAS, num_threads

import aiayn


def make(m, k, n, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / max(k, 1) ** 0.5
    w_q, ws = AF.quantize_weight_int8(w)
    b = 0.5 * torch.randn(n, generator=g) if bias else None
    return x, w, w_q, ws, b


def assert_same(out, ref, what):
    assert out.dtype == torch.float32 and out.shape == ref.shape, what
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), what
    ok = torch.isnan(ref) | (out == ref)
    if not bool(ok.all()):
        i = (~ok).nonzero()[0].tolist()
        raise AssertionError(f"{what}: first mismatch at {i}: {out[tuple(i)].item()!r} vs {ref[tuple(i)].item()!r}")


SHAPES = [(1, 1, 1), (1, 8, 32), (3, 1000, 17), (17, 67, 33), (33, 130, 31), (5, 3, 5), (2, 5, 16),
          (40, 512, 64), (260, 100, 70), (7, 2049, 19), (4, 64, 129)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_bit_exact_against_integer_reference(isa, m, k, n, activation):
    x, _, w_q, ws, b = make(m, k, n, bias=(m + n) % 2 == 1, seed=m * 1000 + k + n)
    out = AF.linear_int8(x, w_q, ws, b, activation)
    ref = reference.linear_int8(x, w_q, ws, b, activation)
    assert_same(out, ref, f"{isa} {m}x{k}x{n} {activation}")
    packed = AF.linear_int8_pack(w_q)
    assert_same(AF.linear_int8(x, w_q, ws, b, activation, w_packed=packed), ref, f"{isa} packed")


def test_accumulators_exact_at_the_int32_limit(isa):
    """The largest sums the op allows: K = 131072, x quantizing to +-127, W at -128 / 127. The
    AVX-512 kernel's unsigned x + 128 sums overflow int32 here; its wrapping adds and the + 128
    correction still give the exact sum (checked through a scale of 1 and no rounding: the
    sums are multiples of 2^7, exact in float32 up to 2^31)."""
    K = 131072
    x = torch.ones(2, K)
    x[1, ::2] = -1.0
    w = torch.full((16, K), -128, dtype=torch.int8)
    w[1::2] = 127
    ws = torch.ones(16)
    acc, xs = reference.linear_int8_accumulators(x, w)
    assert acc.abs().max() < 2**31 and acc.min() == -K * 127 * 128
    out = AF.linear_int8(x, w, ws)
    assert_same(out, reference.linear_int8(x, w, ws), isa)


def test_zero_and_non_finite_rows(isa):
    x, _, w_q, ws, b = make(5, 37, 21)
    x[1] = 0.0
    x[2, 3] = float("inf")
    x[3, 30] = float("nan")
    x[4] *= 1e30  # large but finite: the scale absorbs it
    out = AF.linear_int8(x, w_q, ws, b, "relu")
    assert torch.equal(out[1], torch.relu(b))  # scale 0, not NaN
    assert torch.isnan(out[2]).all() and torch.isnan(out[3]).all()
    assert torch.isfinite(out[[0, 1, 4]]).all()
    assert_same(out, reference.linear_int8(x, w_q, ws, b, "relu"), isa)


def test_strided_bf16_and_batched_inputs(isa):
    x, _, w_q, ws, b = make(24, 80, 40)
    ref_all = reference.linear_int8(x, w_q, ws, b)
    xt = x.t().contiguous().t()  # column-major
    assert_same(AF.linear_int8(xt, w_q, ws, b), ref_all, "column-major x")
    wide = torch.randn(24, 200)
    wide[:, 50:130] = x
    assert_same(AF.linear_int8(wide[:, 50:130], w_q, ws, b), ref_all, "row-strided x")
    assert_same(AF.linear_int8(x.view(2, 3, 4, 80), w_q, ws, b), ref_all.view(2, 3, 4, 40), "3 leading dims")
    xb = x.to(torch.bfloat16)
    assert_same(AF.linear_int8(xb, w_q, ws, b), reference.linear_int8(xb.float(), w_q, ws, b), "bf16 x")
    wq_t = w_q.t().contiguous().t()  # a non-contiguous int8 weight is packed from a copy
    assert_same(AF.linear_int8(x, wq_t, ws, b), ref_all, "strided w")


def test_same_bits_on_every_isa_and_thread_count():
    x, _, w_q, ws, b = make(70, 300, 90)
    packed = AF.linear_int8_pack(w_q)  # one layout for every ISA
    outs = []
    for isa in ISAS:
        with aiayn.cpu_isa(isa):
            for threads in (1, 2):
                with num_threads(threads):
                    outs.append(AF.linear_int8(x, w_q, ws, b, w_packed=packed))
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_error_bound_against_float32():
    """Per element, with x = x_scale q + e (|e| <= x_scale / 2 by rounding) and W = w_scale w_q + d
    (|d| <= w_scale / 2):
        |out - (x W_deq^T + b)| <= 0.5 x_scale sum_k |w_q| w_scale                (activations)
        |out - (x W^T + b)|     <= the above + 0.5 w_scale sum_k |x|               (weights too)
    plus float32 rounding (a relative 1e-5 of the terms' magnitudes covers it here)."""
    x, w, w_q, ws, b = make(50, 512, 96, seed=7)
    out = AF.linear_int8(x, w_q, ws, b).double()
    xs = reference.quantize_rows_int8(x)[1].double()
    w_deq = w_q.double() * ws.double()[:, None]
    act_bound = 0.5 * xs[:, None] * (w_q.double().abs().sum(1) * ws.double())[None, :]
    magnitude = x.double().abs() @ w_deq.abs().T + b.double().abs()
    err_deq = (out - (x.double() @ w_deq.T + b.double())).abs()
    assert (err_deq <= act_bound * 1.0001 + 1e-5 * magnitude).all()
    w_bound = 0.5 * x.double().abs().sum(1)[:, None] * ws.double()[None, :]
    err = (out - (x.double() @ w.double().T + b.double())).abs()
    assert (err <= (act_bound + w_bound) * 1.0001 + 1e-5 * magnitude).all()
    # and in practice far inside it: relative to the output's scale, about 1%
    assert err.max() / (x.double() @ w.double().T).abs().max() < 0.02


def test_opcheck():
    x, _, w_q, ws, b = make(6, 40, 20)
    packed = AF.linear_int8_pack(w_q)
    torch.library.opcheck(torch.ops.aiayn.linear_int8.default, (x, w_q, ws, b, True, packed))
    torch.library.opcheck(torch.ops.aiayn.linear_int8.default, (x, w_q, ws, None, False, None))
    torch.library.opcheck(torch.ops.aiayn.linear_int8_pack.default, (w_q,))


def test_empty_shapes():
    _, _, w_q, ws, b = make(1, 8, 5)
    assert AF.linear_int8(torch.randn(0, 8), w_q, ws, b).shape == (0, 5)
    w0, ws0 = torch.zeros(0, 8, dtype=torch.int8), torch.ones(0)
    assert AF.linear_int8(torch.randn(3, 8), w0, ws0).shape == (3, 0)
    wk0 = torch.zeros(4, 0, dtype=torch.int8)
    out = AF.linear_int8(torch.randn(3, 0), wk0, torch.ones(4), torch.arange(4.0))
    assert torch.equal(out, torch.arange(4.0).expand(3, 4))


def test_bad_inputs_name_the_argument():
    x, w, w_q, ws, b = make(3, 16, 8)
    with pytest.raises(TypeError, match="argument 'w' has dtype Float, expected torch.int8"):
        AF.linear_int8(x, w, ws, b)
    with pytest.raises(TypeError, match="argument 'x' has dtype"):
        AF.linear_int8(x.double(), w_q, ws, b)
    with pytest.raises(ValueError, match=r"argument 'w' must have shape \(out_features, in_features=17\)"):
        AF.linear_int8(torch.randn(3, 17), w_q, ws, b)
    with pytest.raises(ValueError, match=r"argument 'w_scale' must have shape \(out_features=8,\)"):
        AF.linear_int8(x, w_q, ws[:7], b)
    with pytest.raises(TypeError, match="argument 'w_scale' has dtype"):
        AF.linear_int8(x, w_q, ws.double(), b)
    with pytest.raises(ValueError, match=r"argument 'b' must have shape \(out_features=8,\)"):
        AF.linear_int8(x, w_q, ws, b[:5])
    with pytest.raises(TypeError, match="argument 'b' has dtype"):
        AF.linear_int8(x, w_q, ws, b.to(torch.bfloat16))
    with pytest.raises(ValueError, match="argument 'w_packed' must be linear_int8_pack"):
        AF.linear_int8(x, w_q, ws, b, w_packed=AF.linear_int8_pack(w_q[:, :8]))
    with pytest.raises(ValueError, match="argument 'activation'"):
        AF.linear_int8(x, w_q, ws, b, "gelu")
    with pytest.raises(ValueError, match="in_features=131073"):
        AF.linear_int8(torch.randn(1, 131073), torch.zeros(1, 131073, dtype=torch.int8), torch.ones(1))
    with pytest.raises(RuntimeError, match="inference only"):
        AF.linear_int8(x.requires_grad_(), w_q, ws, b)
    with pytest.raises(ValueError, match="argument 'w' must be a 2-d floating-point tensor"):
        AF.quantize_weight_int8(w_q)


def test_weight_quantization():
    w = torch.randn(10, 33)
    w[3] = 0.0
    w_q, ws = AF.quantize_weight_int8(w)
    assert w_q.dtype == torch.int8 and ws.dtype == torch.float32 and ws[3] == 1.0
    assert w_q.abs().max() == 127 and (w_q.abs().amax(1)[[0, 1, 2, 4]] == 127).all()
    assert ((w_q.float() * ws[:, None] - w).abs() <= 0.5 * ws[:, None] * (1 + 1e-6)).all()
