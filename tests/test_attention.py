"""scaled_dot_product_attention on the CPU (paper §3.2.1): the fused flash-style kernels against
the float64 reference with the 2x rule, on every ISA variant; masks, causal, dropout (exact, with
the returned mask), gradients, opcheck, torch.compile, odd lengths, strided inputs and bad calls."""

import collections
import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import aiayn  # noqa: F401  (registers the ops)
from aiayn import functional as AF
from aiayn import reference
from conftest import assert_2x_rule, num_threads

DTYPES = [torch.float32, torch.bfloat16]


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


def make_mask(kind, B, H, Lq, Lk, dtype):
    """(attn_mask, key_padding_mask) of a kind; every query keeps at least one key except in
    'full_rows' where some rows lose them all."""
    if kind == "none":
        return None, None
    if kind == "key_padding":
        pad = torch.rand(B, Lk) < 0.3
        pad[:, 0] = False
        return None, pad
    if kind == "bool":
        m = torch.rand(1, H, Lq, Lk) < 0.7
        m[..., 0] = True
        return m, None
    if kind == "float":
        m = torch.randn(B, 1, Lq, Lk).to(dtype)
        m[..., 1:][torch.rand(B, 1, Lq, Lk - 1) < 0.2] = float("-inf")
        return m, None
    if kind == "full_rows":
        m = torch.rand(Lq, Lk) < 0.5
        m[::3] = False  # every third query sees nothing
        return m, None
    raise ValueError(kind)


def _mask64(attn_mask):
    return None if attn_mask is None else (attn_mask if attn_mask.dtype == torch.bool else attn_mask.double())


def references(q, k, v, attn_mask, kpm, p, causal, scale, keep):
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), _mask64(attn_mask),
                                                 kpm, p, causal, scale, keep)
    theirs = reference.scaled_dot_product_attention(q, k, v, attn_mask, kpm, p, causal, scale, keep)
    if q.dtype == torch.bfloat16:
        # torch's own bf16 attention: the math reference in bf16 is far worse than torch's SDPA
        # kernel, so compare against the better of the two.
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=_torch_mask(attn_mask, kpm, q), is_causal=False,
                                              scale=scale) if p == 0 and not causal else theirs
        theirs = sdpa if (sdpa.double() - ref).abs().max() < (theirs.double() - ref).abs().max() else theirs
    return ref, theirs


def reference_backward(q, k, v, grad, attn_mask, kpm, p, causal, keep):
    """The float64 reference and the same math in q's dtype (the 2x rule's baseline for gradients),
    each run forward and backward on fresh leaves: (ref out, ref leaves, their out, their leaves)."""
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.scaled_dot_product_attention(*ref_leaves, _mask64(attn_mask), kpm, p, causal, None, keep)
    ref.backward(grad.double())
    t_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    theirs = reference.scaled_dot_product_attention(*t_leaves, attn_mask, kpm, p, causal, None, keep)
    theirs.backward(grad)
    return ref, ref_leaves, theirs, t_leaves


def _torch_mask(attn_mask, kpm, q):
    if kpm is None:
        return attn_mask
    keep = ~kpm[:, None, None, :]
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.masked_fill(~keep, float("-inf"))


CASES = [  # (B, H, Lq, Lk, D)
    (1, 1, 1, 1, 16), (2, 3, 7, 7, 32), (1, 2, 48, 48, 64), (2, 1, 129, 129, 80), (1, 2, 7, 129, 128),
    (1, 1, 129, 48, 64), (1, 1, 1, 1000, 64), (1, 1, 512, 512, 64), (1, 1, 200, 100, 256),
]


@pytest.mark.parametrize("B,H,Lq,Lk,D", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_matches_reference(rng_seed, B, H, Lq, Lk, D, dtype, causal):
    q, k, v = rand(B, H, Lq, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype)
    out = AF.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert out.shape == (B, H, Lq, D) and out.dtype == dtype and out.is_contiguous()
    ref, theirs = references(q, k, v, None, None, 0.0, causal, None, None)
    if causal:  # torch's math path in the dtype
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if Lq > Lk:  # rows past Lk see every key in both; torch's kernel agrees
            pass
    assert_2x_rule(out, theirs, ref, f"fwd {dtype} causal={causal} {B, H, Lq, Lk, D}", seed=rng_seed, slack=1e-6)


def _better_of_torch(q, k, v, kpm, causal, ref, theirs):
    """torch's math in q's dtype or its SDPA kernel (mask = causal & ~key padding), whichever is
    closer to the reference: the 2x rule's baseline at its strictest."""
    visible = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
    if causal:
        visible = visible.tril()
    if kpm is not None:
        visible = visible & ~kpm[:, None, None, :]
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    return sdpa if (sdpa.double() - ref).abs().max() < (theirs.double() - ref).abs().max() else theirs


LONG_CASES = [(512, 512, 80), (1000, 1000, 64), (512, 1000, 80), (1000, 512, 64)]  # (Lq, Lk, D)


def _check_long_sequences(isa, rng_seed, Lq, Lk, D, dtype):
    B, H = 1, 2
    q, k, v = rand(B, H, Lq, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype)
    _, pad = make_mask("key_padding", B, H, Lq, Lk, dtype)  # key 0 kept: no row loses every key
    for kpm, causal in ((None, False), (pad, False), (pad, True)):
        out = AF.scaled_dot_product_attention(q, k, v, key_padding_mask=kpm, is_causal=causal)
        ref, theirs = references(q, k, v, None, kpm, 0.0, causal, None, None)
        theirs = _better_of_torch(q, k, v, kpm, causal, ref, theirs)
        assert_2x_rule(out, theirs, ref, f"{isa} {dtype} Lq={Lq} Lk={Lk} D={D} padded={kpm is not None} "
                       f"causal={causal}", seed=rng_seed, slack=1e-6)


@pytest.mark.parametrize("Lq,Lk,D", LONG_CASES)
def test_long_sequences_every_isa(isa, rng_seed, Lq, Lk, D):
    """Hundreds of keys (many 64-key blocks, rescaled running max), D = 80 (not a multiple of the
    16 lanes), Lq != Lk both ways, key padding and causal (Lq > Lk: the last rows see every key) on
    each ISA variant, float32."""
    _check_long_sequences(isa, rng_seed, Lq, Lk, D, torch.float32)


@pytest.mark.parametrize("Lq,Lk,D", LONG_CASES)
def test_long_sequences_every_isa_bf16(isa_bf16, rng_seed, Lq, Lk, D):
    """test_long_sequences_every_isa in bfloat16, with every bf16 GEMM mode of AVX-512."""
    _check_long_sequences(isa_bf16, rng_seed, Lq, Lk, D, torch.bfloat16)


@pytest.mark.parametrize("kind", ["key_padding", "bool", "float", "full_rows"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masks(isa, rng_seed, kind, causal, dtype):
    B, H, Lq, Lk, D = 2, 3, 70, 70, 40
    q, k, v = rand(B, H, Lq, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype)
    attn_mask, kpm = make_mask(kind, B, H, Lq, Lk, dtype)
    out = AF.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, key_padding_mask=kpm, is_causal=causal)
    ref, theirs = references(q, k, v, attn_mask, kpm, 0.0, causal, None, None)
    assert not torch.isnan(out).any()
    assert_2x_rule(out, theirs, ref, f"mask {kind} causal={causal} {isa} {dtype}", seed=rng_seed, slack=2e-6)
    if kind == "full_rows":
        assert torch.equal(out[:, :, ::3], torch.zeros_like(out[:, :, ::3]))


@pytest.mark.parametrize("B,H,Lq,Lk,D", [(1, 1, 1, 1, 5), (2, 2, 17, 33, 16), (1, 2, 65, 65, 64), (1, 1, 3, 130, 33)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_isa(isa, rng_seed, B, H, Lq, Lk, D, dtype):
    q, k, v = rand(B, H, Lq, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype)
    for causal in (False, True):
        out = AF.scaled_dot_product_attention(q, k, v, is_causal=causal)
        ref, theirs = references(q, k, v, None, None, 0.0, causal, None, None)
        if causal:
            theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert_2x_rule(out, theirs, ref, f"{isa} {dtype} causal={causal}", seed=rng_seed, slack=1e-6)


def _aten_ops(fn):
    """The aten ops fn() dispatches on the CPU, counted by name (torch.profiler)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


# What a copy of an input shows in the profile: Tensor::contiguous() -> clone -> copy_.
COPY_OPS = ("aten::contiguous", "aten::clone")


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views_of_fused_qkv_are_not_copied(rng_seed, dtype):
    """Views of a fused (B, L, 3, H, D) projection (last dim contiguous) go to the kernels as they
    are, forward and backward: the profile shows the same aten ops as for contiguous inputs (no
    contiguous / clone / extra copy_), while a strided last dim (the positive control) is copied."""
    B, L, H, D = 2, 37, 4, 32
    qkv = rand(B, L, 3, H, D, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, D) views, last dim contiguous
    assert not q.is_contiguous() and q.stride(-1) == 1
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # q's values, strided last dim
    assert qt.stride(-1) != 1

    def fwd(q, k, v):
        return AF.scaled_dot_product_attention(q, k, v, is_causal=True)

    views, contiguous, control = _aten_ops(lambda: fwd(q, k, v)), _aten_ops(lambda: fwd(qc, kc, vc)), \
        _aten_ops(lambda: fwd(qt, k, v))
    assert views == contiguous and not any(views[n] for n in COPY_OPS), f"forward copies: {views} vs {contiguous}"
    assert all(control[n] for n in COPY_OPS) and control["aten::copy_"] > views["aten::copy_"], control
    out = fwd(q, k, v)
    assert torch.equal(out, fwd(qc, kc, vc)) and torch.equal(fwd(qt, k, v), out)
    ref, theirs = references(q, k, v, None, None, 0.0, True, None, None)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_2x_rule(out, theirs, ref, f"fused qkv views {dtype}", seed=rng_seed)

    # The backward op on the same views, with dO the view a (B, L, H, D) -> (B, H, L, D) transpose
    # gives (bfloat16: dQ's float32 accumulator is rounded with one copy_, whatever the inputs).
    seed = torch.tensor([1], dtype=torch.int64)
    out, lse = torch.ops.aiayn.attention_fwd(q, k, v, None, None, 0.0, True, D ** -0.5, seed, True)
    grad = rand(B, L, H, D, dtype=dtype).transpose(1, 2)
    grad_c = grad.contiguous()

    def bwd(grad, q, k, v):
        return torch.ops.aiayn.attention_bwd(grad, q, k, v, out, lse, None, None, 0.0, True, D ** -0.5, seed)

    views, contiguous, control = (_aten_ops(lambda: bwd(grad, q, k, v)),
                                  _aten_ops(lambda: bwd(grad_c, qc, kc, vc)),
                                  _aten_ops(lambda: bwd(grad, qt, k, v)))
    assert views == contiguous and not any(views[n] for n in COPY_OPS), f"backward copies: {views} vs {contiguous}"
    assert all(control[n] for n in COPY_OPS) and control["aten::copy_"] > views["aten::copy_"], control
    for a, b in zip(bwd(grad, q, k, v), bwd(grad_c, qc, kc, vc)):
        assert torch.equal(a, b)


def _logit_slack(max_logit, ref):
    """What float32 logits of magnitude max_logit carry: absolute rounding errors of a few ulps
    (2^-24 |s| each), which move exp(s) relatively by as much, hence the result by that times its
    magnitude; plus 1e-3 for rows near one-hot, whose tiny probabilities rounding makes nonzero."""
    return 8 * 2.0 ** -24 * max_logit * ref.abs().max().item() + 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits_do_not_overflow(isa, rng_seed, dtype):
    """Logits |q . k * scale| of 1e4 and more (q, k ~ 64 N(0, 1)): the online softmax subtracts the
    running max before exp, so nothing overflows, forward or backward. The errors both we and
    torch make there are those of rounding logits near 1e4 (see _logit_slack)."""
    B, H, Lq, Lk, D = 1, 2, 33, 40, 64
    q, k, v = rand(B, H, Lq, D, dtype=dtype, scale=64.0), rand(B, H, Lk, D, dtype=dtype, scale=64.0), \
        rand(B, H, Lk, D, dtype=dtype)
    max_logit = (q.double() @ k.double().transpose(-1, -2)).abs().max().item() / math.sqrt(D)
    assert max_logit >= 1e4, f"max |logit| {max_logit:.3g} (seed {rng_seed})"
    out = AF.scaled_dot_product_attention(q, k, v)
    assert torch.isfinite(out).all()
    ref, theirs = references(q, k, v, None, None, 0.0, False, None, None)
    assert_2x_rule(out, theirs, ref, f"large logits {isa} {dtype}", seed=rng_seed, slack=_logit_slack(max_logit, ref))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = AF.scaled_dot_product_attention(*leaves)
    grad = torch.randn_like(out)
    out.backward(grad)
    _, ref_leaves, _, t_leaves = reference_backward(q, k, v, grad, None, None, 0.0, False, None)
    for name, ours, r, t in zip("qkv", leaves, ref_leaves, t_leaves):
        assert torch.isfinite(ours.grad).all()
        assert_2x_rule(ours.grad, t.grad, r.grad, f"large logits grad {name} {isa} {dtype}", seed=rng_seed,
                       slack=_logit_slack(max_logit, r.grad))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("kind,causal,p", [("none", False, 0.0), ("key_padding", True, 0.0), ("float", False, 0.2),
                                           ("full_rows", False, 0.0), ("bool", True, 0.1)])
def test_backward_matches_reference(isa, rng_seed, dtype, kind, causal, p):
    B, H, Lq, Lk, D = 2, 2, 67, 75, 24
    q, k, v = rand(B, H, Lq, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype)
    attn_mask, kpm = make_mask(kind, B, H, Lq, Lk, dtype)
    if kind == "full_rows":
        attn_mask[:, -1] = False  # and a key no query sees
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, keep = AF.scaled_dot_product_attention(*leaves, attn_mask=attn_mask, key_padding_mask=kpm, dropout_p=p,
                                                is_causal=causal, return_dropout_mask=True)
    grad = torch.randn_like(out)
    out.backward(grad)
    _, ref_leaves, _, t_leaves = reference_backward(q, k, v, grad, attn_mask, kpm, p, causal, keep)
    for name, ours, r, t in zip("qkv", leaves, ref_leaves, t_leaves):
        assert ours.grad.dtype == dtype and not torch.isnan(ours.grad).any()
        assert_2x_rule(ours.grad, t.grad, r.grad, f"grad {name} {isa} {dtype} {kind} causal={causal} p={p}",
                       seed=rng_seed, slack=1e-5 if dtype != torch.float64 else 1e-10)
    if kind == "full_rows":
        assert torch.equal(leaves[0].grad[:, :, ::3], torch.zeros_like(leaves[0].grad[:, :, ::3]))
        # The key no query sees gets exactly zero dK and dV; and the fully masked rows add nothing
        # to any gradient: dO on those rows alone gives dQ = dK = dV = 0 exactly.
        assert torch.equal(leaves[1].grad[..., -1, :], torch.zeros_like(leaves[1].grad[..., -1, :]))
        assert torch.equal(leaves[2].grad[..., -1, :], torch.zeros_like(leaves[2].grad[..., -1, :]))
        dead_grad = torch.zeros_like(grad)
        dead_grad[:, :, ::3] = grad[:, :, ::3]
        out = AF.scaled_dot_product_attention(*leaves, attn_mask=attn_mask, is_causal=causal)
        for name, g in zip("qkv", torch.autograd.grad(out, leaves, dead_grad)):
            assert torch.equal(g, torch.zeros_like(g)), f"d{name} from fully masked rows (seed {rng_seed})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk,causal", [(513, 513, True), (300, 700, False)])
@pytest.mark.parametrize("padded", [False, True])
def test_backward_long_sequences(isa, rng_seed, dtype, Lq, Lk, causal, padded):
    """Gradients over many 64-key blocks (513: one key and one query past a block) at D = 80, with
    and without key padding, on each ISA variant: dQ, dK, dV by the 2x rule."""
    B, H, D = 1, 1, 80
    q, k, v = rand(B, H, Lq, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype)
    kpm = make_mask("key_padding", B, H, Lq, Lk, dtype)[1] if padded else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = AF.scaled_dot_product_attention(*leaves, key_padding_mask=kpm, is_causal=causal)
    grad = torch.randn_like(out)
    out.backward(grad)
    _, ref_leaves, _, t_leaves = reference_backward(q, k, v, grad, None, kpm, 0.0, causal, None)
    for name, ours, r, t in zip("qkv", leaves, ref_leaves, t_leaves):
        assert_2x_rule(ours.grad, t.grad, r.grad, f"grad {name} {isa} {dtype} Lq={Lq} Lk={Lk} causal={causal} "
                       f"padded={padded}", seed=rng_seed, slack=1e-5)
    if padded:  # padded keys: exactly zero dK, dV
        assert torch.equal(leaves[1].grad[:, :, kpm[0]], torch.zeros_like(leaves[1].grad[:, :, kpm[0]]))
        assert torch.equal(leaves[2].grad[:, :, kpm[0]], torch.zeros_like(leaves[2].grad[:, :, kpm[0]]))


def _tail_padding(B, Lk, lengths):
    """Key padding as batches of sentences have it: batch b's keys past lengths[b] padded."""
    pad = torch.zeros(B, Lk, dtype=torch.bool)
    for b, n in enumerate(lengths):
        pad[b, n:] = True
    return pad


# Around the one-key-block path (Lk <= 64 keys: plain softmax, P normalised before P V, dK / dV /
# dQ written in place) and the vector widths (16 / 8 / 1 lanes: 16 x 16 transposes of K).
@pytest.mark.parametrize("Lq,Lk,D", [(5, 1, 7), (48, 48, 64), (33, 63, 17), (97, 64, 16), (9, 65, 40), (70, 130, 33)])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("causal,p", [(False, 0.0), (True, 0.15)])
def test_short_sequences_with_tail_padding(isa, rng_seed, Lq, Lk, D, dtype, causal, p):
    # A row over one key has P = 1 and a zero gradient through the softmax, which torch's bf16 math
    # gets exactly; so does ours only because autograd saves the float32 output for delta = dO . O.
    B, H = 4, 2
    q, k, v = rand(B, H, Lq, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype)
    # full length, a padded tail, one visible key, a hole before the tail
    kpm = _tail_padding(B, Lk, [Lk, max(1, Lk * 4 // 5), 1, Lk])
    kpm[3, Lk // 2] = Lk > 2
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, keep = AF.scaled_dot_product_attention(*leaves, key_padding_mask=kpm, dropout_p=p, is_causal=causal,
                                                return_dropout_mask=True)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref, ref_leaves, theirs, t_leaves = reference_backward(q, k, v, grad, None, kpm, p, causal, keep)
    slack = 1e-5 if dtype != torch.float64 else 1e-10
    what = f"{isa} {dtype} Lq={Lq} Lk={Lk} D={D} causal={causal} p={p}"
    assert_2x_rule(out, theirs, ref, what, seed=rng_seed, slack=slack)
    for name, ours, r, t in zip("qkv", leaves, ref_leaves, t_leaves):
        assert not torch.isnan(ours.grad).any()
        assert_2x_rule(ours.grad, t.grad, r.grad, f"grad {name} {what}", seed=rng_seed, slack=slack)
    # padded keys get exactly zero gradients
    assert torch.equal(leaves[1].grad[1, :, max(1, Lk * 4 // 5):], torch.zeros_like(leaves[1].grad[1, :, max(1, Lk * 4 // 5):]))
    assert torch.equal(leaves[2].grad[2, :, 1:], torch.zeros_like(leaves[2].grad[2, :, 1:]))


@pytest.mark.parametrize("L", [48, 200])
def test_one_and_two_threads_give_the_same_bits(rng_seed, L):
    """Tasks never share an output element and, with as many heads as here (one key chunk per
    head at any thread count), every sum runs in the same order: identical results."""
    B, H, D = 4, 8, 64
    q, k, v = (rand(B, H, L, D).requires_grad_() for _ in range(3))
    kpm = _tail_padding(B, L, [L, L - 7, L // 2, 3])
    grad = torch.randn(B, H, L, D)
    results = []
    for n in (1, 2):
        with num_threads(n):
            torch.manual_seed(7)  # the same dropout seed
            out = AF.scaled_dot_product_attention(q, k, v, key_padding_mask=kpm, dropout_p=0.1, is_causal=True)
            results.append((out,) + torch.autograd.grad(out, (q, k, v), grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_gradcheck_float64():
    q, k, v = (torch.randn(1, 2, s, 6, dtype=torch.float64, requires_grad=True) for s in (5, 7, 7))
    pad = torch.tensor([[False, False, True, False, False, True, False]])
    seed = torch.tensor([9], dtype=torch.int64)
    assert torch.autograd.gradcheck(lambda q, k, v: AF.scaled_dot_product_attention(q, k, v), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: AF.scaled_dot_product_attention(q, k, v, key_padding_mask=pad, is_causal=True, dropout_p=0.3,
                                                        seed=seed), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    q, k, v = (rand(2, 2, s, 16, dtype=dtype).requires_grad_() for s in (5, 9, 9))
    pad = torch.rand(2, 9) < 0.3
    mask = torch.randn(5, 9)
    seed = torch.tensor([5], dtype=torch.int64)
    torch.library.opcheck(torch.ops.aiayn.attention_fwd.default, (q, k, v, None, None, 0.0, False, 0.25, seed))
    torch.library.opcheck(torch.ops.aiayn.attention_fwd.default, (q, k, v, mask, pad, 0.2, True, 0.25, seed))
    torch.library.opcheck(torch.ops.aiayn.attention_fwd.default, (q, k, v, mask, pad, 0.2, True, 0.25, seed, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_backward(dtype):
    """attention_bwd (the backward op autograd calls) passes opcheck like the forward: schema, fake
    kernel, autograd registration, AOT dispatch; with the saved output in q's dtype and in float32
    (float_out, bfloat16 training), masks, dropout, causal, and fused-QKV views."""
    q, k, v = (rand(2, 2, s, 16, dtype=dtype) for s in (5, 9, 9))
    pad = torch.rand(2, 9) < 0.3
    mask = torch.randn(5, 9)
    seed = torch.tensor([5], dtype=torch.int64)
    qkv = rand(2, 9, 3, 2, 16, dtype=dtype)
    views = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    for (q, k, v), rest in (((q, k, v), (None, None, 0.0, False, 0.25)), ((q, k, v), (mask, pad, 0.2, True, 0.25)),
                            (views, (None, pad, 0.1, True, 0.25))):
        for float_out in (False, True):
            out, lse = torch.ops.aiayn.attention_fwd(q, k, v, *rest, seed, float_out)
            grad = rand(*out.shape, dtype=dtype)
            torch.library.opcheck(torch.ops.aiayn.attention_bwd.default, (grad, q, k, v, out, lse, *rest, seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("logit_scale", [1.0, 300.0])
def test_log_sum_exp(isa_bf16, rng_seed, dtype, logit_scale):
    """The log-sum-exp attention_fwd saves for the backward (computed W rows at a time in float64,
    Vec::log_sum_exp) against float64 with the 2x rule over torch's logsumexp in q's dtype (the
    AMX softmax's short exp2 polynomial is bf16-grade, ~3e-5 here); +inf for a fully masked row.
    Lengths around the vector widths (1, 7, 16, 17, 33, 100), large logits."""
    for Lq, Lk in ((1, 5), (7, 48), (16, 16), (17, 129), (33, 40), (100, 7)):
        q = rand(2, 2, Lq, 32, dtype=dtype, scale=logit_scale)
        k, v = rand(2, 2, Lk, 32, dtype=dtype), rand(2, 2, Lk, 32, dtype=dtype)
        pad = torch.rand(2, Lk) < 0.3
        pad[0] = True  # batch 0: every row fully masked
        pad[1, 0] = False
        seed = torch.tensor([3], dtype=torch.int64)
        _, lse = torch.ops.aiayn.attention_fwd(q, k, v, None, pad, 0.0, False, 0.125, seed)
        assert lse.shape == (2, 2, Lq) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.isinf(lse[0]).all() and (lse[0] > 0).all()

        def scores(dt):
            s = (q[1:].to(dt) @ k[1:].to(dt).transpose(-1, -2)) * 0.125
            return s.masked_fill(pad[1:, None, None, :], float("-inf"))

        ref = torch.logsumexp(scores(torch.float64), -1)
        theirs = torch.logsumexp(scores(dtype), -1)
        slack = 1e-10 if dtype == torch.float64 else 1e-6 * logit_scale
        assert_2x_rule(lse[1:], theirs, ref, f"lse {Lq}x{Lk}", slack=slack, seed=rng_seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_float_out(isa_bf16, rng_seed, dtype):
    """attention_fwd(float_out=True) returns the unrounded float32 output for a bfloat16 q (what
    autograd saves for the backward) and q's dtype otherwise; attention_bwd takes either."""
    q, k, v = rand(2, 3, 37, 32, dtype=dtype), rand(2, 3, 45, 32, dtype=dtype), rand(2, 3, 45, 32, dtype=dtype)
    pad = torch.rand(2, 45) < 0.3
    seed = torch.tensor([11], dtype=torch.int64)
    for p in (0.0, 0.2):
        args = (q, k, v, None, pad, p, True, 0.2, seed)
        out, lse = torch.ops.aiayn.attention_fwd(*args)
        wide, lse_wide = torch.ops.aiayn.attention_fwd(*args, float_out=True)
        assert wide.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype) and wide.shape == out.shape
        torch.testing.assert_close(lse_wide, lse, rtol=1e-4, atol=1e-4)  # AMX: another tile path
        keep = reference.dropout_mask((2, 3, 37, 45), p, seed)
        ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), None, pad, p, True, 0.2, keep)
        if dtype == torch.bfloat16:
            # float32 accuracy, far inside the bf16 rounding of `out`
            assert (wide.double() - ref).abs().max() < 1e-4
            assert (wide.to(dtype).double() - out.double()).abs().max() <= 2 ** -7 * out.double().abs().max()
        else:
            assert torch.equal(wide, out)
        grad = rand(*out.shape, dtype=dtype)
        grads = torch.ops.aiayn.attention_bwd(grad, *args[:3], out, lse, None, pad, p, True, 0.2, seed)
        grads_wide = torch.ops.aiayn.attention_bwd(grad, *args[:3], wide, lse, None, pad, p, True, 0.2, seed)
        for g, gw in zip(grads, grads_wide):
            assert gw.dtype == dtype and not torch.isnan(gw).any()
            if dtype != torch.bfloat16:
                assert torch.equal(g, gw)


@pytest.mark.parametrize("D,causal,p", [(64, False, 0.0), (64, True, 0.1), (40, False, 0.1), (32, True, 0.0)])
def test_bf16_key_gradients_sum_to_zero(isa_bf16, rng_seed, D, causal, p):
    """Each row's dS sums to zero (softmax), so the key gradients of a head sum to zero: sum_j dK_j =
    scale * sum_i (sum_j dS_ij) q_i. A delta = dO . O from an output rounded to bf16 (or from a P V
    on bf16-rounded P) breaks it by O's rounding times P; rows over few keys make that visible. Ours
    may miss zero only by the bf16 rounding of each dK_j."""
    B, H, Lq, Lk = 3, 2, 64, 50
    q, k, v = (rand(B, H, L, D, dtype=torch.bfloat16) for L in (Lq, Lk, Lk))
    pad = _tail_padding(B, Lk, [2, 3, Lk])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = AF.scaled_dot_product_attention(*leaves, key_padding_mask=pad, dropout_p=p, is_causal=causal)
    out.backward(torch.randn_like(out))
    dk = leaves[1].grad.double()
    ulp = 2.0 ** (torch.floor(torch.log2(dk.abs().clamp_min(1e-30))) - 7)
    total = dk.sum(2).abs()
    bound = (ulp / 2).sum(2) + 1e-4
    assert (total <= bound).all(), f"sum_j dK_j off zero by {(total - bound).max().item():.3e} (seed {rng_seed})"


def test_torch_compile_fullgraph(rng_seed):
    q, k, v = (rand(2, 2, 20, 16) for _ in range(3))
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[:, -3:] = True

    def f(q, k, v):
        return AF.scaled_dot_product_attention(q * 2, k, v, key_padding_mask=pad, is_causal=True).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


def test_torch_compile_fullgraph_bf16_training(rng_seed):
    """The bf16 training path (float32 output saved, the caller's rounded) traces as one graph and
    gives eager's gradients."""
    q, k, v = (rand(2, 2, 20, 32, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[:, -3:] = True

    def f(q, k, v):
        return AF.scaled_dot_product_attention(q * 2, k, v, key_padding_mask=pad, is_causal=True, dropout_p=0.1,
                                               seed=torch.tensor([7])).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    grad = torch.randn(2, 2, 20, dtype=torch.bfloat16)
    ours = torch.autograd.grad(compiled(q, k, v), (q, k, v), grad)
    eager = torch.autograd.grad(f(q, k, v), (q, k, v), grad)
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b)


# Lk % 4 == 0 without an attention mask runs the float32 forward on transposed blocks, whose keep
# masks come from Philox lanes one row apart (transposed_keep_words); other lengths the row path.
@pytest.mark.parametrize("Lq,Lk,causal", [(50, 50, False), (48, 48, False), (37, 132, False), (200, 200, True)])
def test_dropout_exact_and_keep_rate(isa, Lq, Lk, causal):
    q, k, v = rand(2, 3, Lq, 32), rand(2, 3, Lk, 32), rand(2, 3, Lk, 32)
    torch.manual_seed(1)
    out, keep = AF.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=causal, return_dropout_mask=True)
    torch.manual_seed(1)
    out2 = AF.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=causal)
    assert torch.equal(out, out2), "reproducible under torch.manual_seed"
    assert keep.shape == (2, 3, Lq, Lk)
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), dropout_p=0.25,
                                                 is_causal=causal, keep_mask=keep)
    assert (out.double() - ref).abs().max().item() < 1e-5
    rate = keep.float().mean().item()
    n = keep.numel()
    assert abs(rate - 0.75) < 5 * math.sqrt(0.75 * 0.25 / n)
    assert not torch.equal(keep, AF.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=causal,
                                                                 return_dropout_mask=True)[1])
    assert torch.equal(AF.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=causal, training=False),
                       AF.scaled_dot_product_attention(q, k, v, is_causal=causal))


def test_decode_step_shapes(isa, rng_seed):
    # One or a few query rows against a KV cache (incremental decoding, beam search).
    for Lq, Lk in [(1, 48), (2, 48), (1, 1), (4, 300)]:
        q, k, v = rand(16, 8, Lq, 64), rand(16, 8, Lk, 64), rand(16, 8, Lk, 64)
        pad = torch.rand(16, Lk) < 0.2
        pad[:, 0] = False
        out = AF.scaled_dot_product_attention(q, k, v, key_padding_mask=pad)
        ref, theirs = references(q, k, v, None, pad, 0.0, False, None, None)
        assert_2x_rule(out, theirs, ref, f"decode Lq={Lq} Lk={Lk}", seed=rng_seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_decode_step_masks_dropout_and_gradients(isa, rng_seed, dtype, causal):
    """Decode steps (1 to 4 query rows against a longer cache) with a float attn_mask (-inf holes),
    dropout and, causal, torch's top-left alignment (query i sees keys 0..i only, however long the
    cache): the output against the reference with the returned dropout mask (float32: exactly, as
    test_dropout_exact_and_keep_rate; bfloat16: 2x rule), and the gradients by the 2x rule."""
    B, H, D, p = 4, 4, 64, 0.2
    for Lq, Lk in [(1, 48), (3, 130), (4, 300)]:
        q, k, v = rand(B, H, Lq, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype)
        attn_mask, _ = make_mask("float", B, H, Lq, Lk, dtype)  # key 0 never -inf: no row loses every key
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, keep = AF.scaled_dot_product_attention(*leaves, attn_mask=attn_mask, dropout_p=p, is_causal=causal,
                                                    return_dropout_mask=True)
        assert out.shape == (B, H, Lq, D) and keep.shape == (B, H, Lq, Lk)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref, ref_leaves, theirs, t_leaves = reference_backward(q, k, v, grad, attn_mask, None, p, causal, keep)
        what = f"decode {isa} {dtype} Lq={Lq} Lk={Lk} causal={causal}"
        if dtype == torch.float32:
            assert (out.double() - ref).abs().max().item() < 1e-5, what
        assert_2x_rule(out, theirs, ref, what, seed=rng_seed, slack=1e-6)
        for name, ours, r, t in zip("qkv", leaves, ref_leaves, t_leaves):
            assert_2x_rule(ours.grad, t.grad, r.grad, f"grad {name} {what}", seed=rng_seed, slack=1e-5)
        if causal:  # keys past Lq take part in no row
            assert torch.equal(leaves[2].grad[:, :, Lq:], torch.zeros_like(leaves[2].grad[:, :, Lq:]))


def test_empty_and_degenerate():
    q, k, v = rand(0, 2, 5, 8), rand(0, 2, 5, 8), rand(0, 2, 5, 8)
    assert AF.scaled_dot_product_attention(q, k, v).shape == (0, 2, 5, 8)
    q, k, v = rand(1, 1, 3, 8, dtype=torch.float32).requires_grad_(), rand(1, 1, 0, 8).requires_grad_(), rand(1, 1, 0, 8)
    out = AF.scaled_dot_product_attention(q, k, v.requires_grad_())
    assert torch.equal(out, torch.zeros(1, 1, 3, 8))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_nan_input_propagates():
    q, k, v = rand(1, 1, 4, 8), rand(1, 1, 4, 8), rand(1, 1, 4, 8)
    v[0, 0, 2, 3] = float("nan")
    out = AF.scaled_dot_product_attention(q, k, v)
    assert torch.isnan(out[..., 3]).all() and not torch.isnan(out[..., :3]).any()


# The float32 / float64 forward without attention mask or dropout runs on transposed score blocks
# (attention_kernel.h, forward_block_t: key rows by query lanes, the softmax's state in lanes);
# masks or dropout, or a scale <= 0, take the row path. Both meet the reference here.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("step", [0.1, 4.0])
@pytest.mark.parametrize("causal", [False, True])
def test_running_max_rising_across_key_blocks_float(isa, rng_seed, dtype, step, causal):
    """Scores that grow along the keys move every row's running max at every 64-key block (by ~1 or
    ~46 in log2 units), so O and l are rescaled each time; the log-sum-exp too."""
    B, H, Lq, Lk, D = 2, 2, 33, 300, 64
    q, k, v = (rand(B, H, L, D, dtype=dtype) for L in (Lq, Lk, Lk))
    q[..., 0] = 1.0 + 0.1 * q[..., 0].abs()
    k[..., 0] += step * torch.arange(Lk, dtype=dtype)
    out = AF.scaled_dot_product_attention(q, k, v, is_causal=causal)
    ref, theirs = references(q, k, v, None, None, 0.0, causal, None, None)
    slack = 1e-6 if dtype == torch.float32 else 1e-12
    assert_2x_rule(out, theirs, ref, f"{isa} {dtype} step={step} causal={causal}", seed=rng_seed, slack=slack)
    with torch.no_grad():
        _, lse = torch.ops.aiayn.attention_fwd(q, k, v, None, None, 0.0, causal, D ** -0.5, torch.tensor([0]))
        s = q.double() @ k.double().transpose(-1, -2) / D ** 0.5
        if causal:
            s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("Lq,Lk", [(5, 40), (40, 40), (100, 130)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, -0.3])
def test_every_key_padded_and_nan_scores(isa, rng_seed, Lq, Lk, causal, scale):
    """A batch whose keys are all padded gets zero rows (no NaN), as do causal rows whose only keys
    are padded; the other rows the reference's; a NaN in a key makes every row that sees it NaN, a NaN in a query only its own row."""
    B, H, D = 3, 2, 24
    q, k, v = rand(B, H, Lq, D), rand(B, H, Lk, D), rand(B, H, Lk, D)
    kpm = torch.rand(B, Lk) < 0.3
    kpm[:, 0] = False
    kpm[1] = True
    kpm[2, :3] = torch.tensor([True, True, False])  # causal: queries 0 and 1 see no key (zero rows)
    out = AF.scaled_dot_product_attention(q, k, v, key_padding_mask=kpm, is_causal=causal, scale=scale)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    if causal:
        assert torch.equal(out[2, :, :2], torch.zeros_like(out[2, :, :2]))
    keep = torch.tensor([0, 2])
    ref, theirs = references(q[keep], k[keep], v[keep], None, kpm[keep], 0.0, causal, scale, None)
    # test_masks's float32 slack: with ~30% of the keys padded, one element in a few thousand draws
    # has ours at ~2.5e-6 where torch's row happened to be at ~7e-7 (over 2000 draws our max error
    # was 2.0e-6, torch's 2.7e-6), which failed 2x + 1e-6.
    assert_2x_rule(out[keep], theirs, ref, f"{isa} Lq={Lq} Lk={Lk} causal={causal} scale={scale}",
                   seed=rng_seed, slack=2e-6)
    k[0, 1, 0, 3] = float("nan")  # key 0: every query of head (0, 1) sees it
    q[2, 0, Lq // 2, 5] = float("nan")
    out = AF.scaled_dot_product_attention(q, k, v, key_padding_mask=kpm, is_causal=causal, scale=scale)
    assert torch.isnan(out[0, 1]).all() and torch.isnan(out[2, 0, Lq // 2]).all()
    rest = torch.ones(B, H, Lq, dtype=torch.bool)
    rest[0, 1] = False
    rest[2, 0, Lq // 2] = False
    rest[1] = False
    assert not torch.isnan(out[rest]).any()


def test_bad_inputs_name_the_argument():
    q, k, v = rand(2, 2, 5, 8), rand(2, 2, 6, 8), rand(2, 2, 6, 8)
    sdpa = AF.scaled_dot_product_attention
    with pytest.raises(ValueError, match="'q' must be 4-D"):
        sdpa(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="'k' must have head_dim"):
        sdpa(q, rand(2, 2, 6, 4), v)
    with pytest.raises(ValueError, match="'v' must have length"):
        sdpa(q, k, rand(2, 2, 7, 8))
    with pytest.raises(ValueError, match="same batch and heads"):
        sdpa(q, rand(1, 2, 6, 8), rand(1, 2, 6, 8))
    with pytest.raises(TypeError, match="'k' has dtype"):
        sdpa(q, k.double(), v)
    with pytest.raises(TypeError, match="'q' has dtype"):
        sdpa(q.half(), k.half(), v.half())
    with pytest.raises(ValueError, match="head_dim"):
        big = rand(1, 1, 2, 300)
        sdpa(big, big, big)
    with pytest.raises(ValueError, match="'attn_mask'.*not broadcastable"):
        sdpa(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="'attn_mask'"):
        sdpa(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="'key_padding_mask'"):
        sdpa(q, k, v, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="'key_padding_mask'"):
        sdpa(q, k, v, key_padding_mask=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="'dropout_p'"):
        sdpa(q, k, v, dropout_p=1.5)
