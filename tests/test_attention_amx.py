"""The bf16 attention forward on Intel AMX tiles (csrc/cpu/attention_amx.h): Q K^T and P V as
tdpbf16ps where the bf16 mode is AMX and the head dim is a multiple of 32. Against the float64
reference by the 2x rule (torch's bf16 SDPA, or its math path in bf16, as the baseline) and against
the widened float32 path, over tile edges (lengths 1, 15, 16, 17, 33, 64, 65, 130), every head
dim the path takes, masks, causal, dropout (exact, with the returned mask), strided views and
fully masked rows. Skips where the CPU or the OS has no AMX."""

import pytest
import torch

from aiayn import functional as AF
from aiayn import reference
from conftest import AMX_SKIP_REASON, assert_2x_rule, bf16_mode, num_threads
from test_attention import make_mask, rand, reference_backward, references

pytestmark = pytest.mark.skipif(AMX_SKIP_REASON is not None, reason=AMX_SKIP_REASON or "")

AMX, WIDENED = 2, 0


@pytest.fixture(params=["amx", "widened"])
def mode(request):
    with bf16_mode(AMX if request.param == "amx" else WIDENED):
        yield request.param


@pytest.mark.parametrize("Lq,Lk", [(5, 1), (15, 16), (16, 17), (17, 33), (64, 64), (65, 65), (97, 130), (200, 129)])
@pytest.mark.parametrize("D", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_tile_edges(mode, rng_seed, Lq, Lk, D, causal):
    B, H = 2, 2
    q, k, v = (rand(B, H, L, D, dtype=torch.bfloat16) for L in (Lq, Lk, Lk))
    out = AF.scaled_dot_product_attention(q, k, v, is_causal=causal)
    ref, theirs = references(q, k, v, None, None, 0.0, causal, None, None)
    if causal:
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_2x_rule(out, theirs, ref, f"{mode} D={D} Lq={Lq} Lk={Lk} causal={causal}", seed=rng_seed, slack=1e-6)


@pytest.mark.parametrize("kind", ["key_padding", "bool", "float", "full_rows"])
@pytest.mark.parametrize("causal", [False, True])
def test_masks(mode, rng_seed, kind, causal):
    B, H, Lq, Lk, D = 2, 3, 70, 101, 64
    q, k, v = (rand(B, H, L, D, dtype=torch.bfloat16) for L in (Lq, Lk, Lk))
    attn_mask, kpm = make_mask(kind, B, H, Lq, Lk, torch.bfloat16)
    out = AF.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, key_padding_mask=kpm, is_causal=causal)
    ref, theirs = references(q, k, v, attn_mask, kpm, 0.0, causal, None, None)
    assert not torch.isnan(out).any()
    assert_2x_rule(out, theirs, ref, f"{mode} mask {kind} causal={causal}", seed=rng_seed, slack=2e-6)
    if kind == "full_rows":
        assert torch.equal(out[:, :, ::3], torch.zeros_like(out[:, :, ::3]))


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_exact(mode, rng_seed, causal):
    B, H, Lq, Lk, D = 2, 2, 81, 150, 32
    q, k, v = (rand(B, H, L, D, dtype=torch.bfloat16) for L in (Lq, Lk, Lk))
    kpm = torch.rand(B, Lk) < 0.2
    kpm[:, 0] = False
    out, keep = AF.scaled_dot_product_attention(q, k, v, key_padding_mask=kpm, dropout_p=0.2, is_causal=causal,
                                                return_dropout_mask=True)
    ref, theirs = references(q, k, v, None, kpm, 0.2, causal, None, keep)
    assert_2x_rule(out, theirs, ref, f"{mode} dropout causal={causal}", seed=rng_seed, slack=1e-6)


def test_strided_views_and_odd_row_strides(mode, rng_seed):
    B, L, H, D = 2, 45, 3, 64
    qkv = rand(B, L, 3, H, D, dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # views of a fused projection: no copy
    out = AF.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_2x_rule(out, theirs, ref, f"{mode} fused qkv views", seed=rng_seed)
    # An odd row stride (a 65-wide buffer sliced to 64) splits the keys' bf16 pairs across 32-bit
    # words: the key packing takes its element-by-element route.
    wide = rand(B, H, L, D + 1, dtype=torch.bfloat16)
    k2 = wide[..., :D]
    assert k2.stride(2) % 2 == 1
    out2 = AF.scaled_dot_product_attention(q, k2, k2)
    ref2 = reference.scaled_dot_product_attention(q.double(), k2.double(), k2.double())
    assert_2x_rule(out2, torch.nn.functional.scaled_dot_product_attention(q, k2, k2), ref2, f"{mode} odd stride",
                   seed=rng_seed)
    # Queries too: whole 16-row groups take Q^T straight from q at an even stride, else a copy.
    out3 = AF.scaled_dot_product_attention(k2, k, v)
    ref3 = reference.scaled_dot_product_attention(k2.double(), k.double(), v.double())
    assert_2x_rule(out3, torch.nn.functional.scaled_dot_product_attention(k2, k, v), ref3, f"{mode} odd query stride",
                   seed=rng_seed)


def test_amx_agrees_with_widened_path(rng_seed):
    # Same softmax, only the products' rounding differs (P rounded to bf16 before P V).
    q, k, v = (rand(2, 4, 300, 64, dtype=torch.bfloat16) for _ in range(3))
    with_mode = []
    for m in (AMX, WIDENED):
        with bf16_mode(m):
            with_mode.append(AF.scaled_dot_product_attention(q, k, v).float())
    assert (with_mode[0] - with_mode[1]).abs().max().item() < 2e-2
    assert not torch.equal(with_mode[0], with_mode[1]), "the AMX path did not run"


def test_thread_count_does_not_change_bits(rng_seed):
    q, k, v = (rand(1, 3, 200, 64, dtype=torch.bfloat16) for _ in range(3))
    with bf16_mode(AMX):
        with num_threads(1):
            one = AF.scaled_dot_product_attention(q, k, v, is_causal=True)
        with num_threads(2):
            two = AF.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(one, two)


@pytest.mark.parametrize("causal", [False, True])
def test_fully_padded_batch_and_negative_scale(mode, rng_seed, causal):
    # Key padding that hides every key of batch 1: zeros there, never NaN (the transposed tiles'
    # path); a negative scale takes the row-wise tiles (the transposed softmax scales the max).
    B, H, L, D = 3, 2, 77, 64
    q, k, v = (rand(B, H, L, D, dtype=torch.bfloat16) for _ in range(3))
    kpm = torch.rand(B, L) < 0.25
    kpm[:, 0] = False
    kpm[1] = True
    out = AF.scaled_dot_product_attention(q, k, v, key_padding_mask=kpm, is_causal=causal)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    keep = ~kpm[[0, 2]]
    ref, theirs = references(q[[0, 2]], k[[0, 2]], v[[0, 2]], None, ~keep, 0.0, causal, None, None)
    assert_2x_rule(out[[0, 2]], theirs, ref, f"{mode} padded causal={causal}", seed=rng_seed, slack=1e-6)
    out_neg = AF.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=-0.3)
    # (torch's bf16 SDPA returns NaN for causal with a negative scale: the math path is the baseline)
    ref, theirs = references(q, k, v, None, None, 0.0, causal, -0.3, None)
    assert_2x_rule(out_neg, theirs, ref, f"{mode} negative scale causal={causal}", seed=rng_seed, slack=1e-6)


@pytest.mark.parametrize("step", [0.05, 0.1, 4.0])
@pytest.mark.parametrize("causal", [False, True])
def test_running_max_rising_across_key_blocks(mode, rng_seed, step, causal):
    """Scores that grow along the keys raise every row's running max block after block (by about
    11.5 * step in log2 units per 64-key block): by less than the transposed path's lazy-rescale
    slack (kAmxRescaleSlack = 1: P then exceeds 1 in the units of the stale max), by about the
    slack, or by far more (O^T rescaled at every block). Output, log-sum-exp and gradients (the
    backward recomputes P from the log-sum-exp) by the 2x rule."""
    B, H, Lq, Lk, D = 2, 2, 33, 300, 64
    q, k, v = (rand(B, H, L, D) for L in (Lq, Lk, Lk))
    q[..., 0] = 1.0 + 0.1 * q[..., 0].abs()
    k[..., 0] += step * torch.arange(Lk)  # +step/8 per key in the scores (scale 1/8)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = AF.scaled_dot_product_attention(*leaves, is_causal=causal)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref, ref_leaves, theirs, t_leaves = reference_backward(q, k, v, grad, None, None, 0.0, causal, None)
    what = f"{mode} step={step} causal={causal}"
    assert_2x_rule(out, theirs, ref, what, seed=rng_seed, slack=1e-5)
    for name, ours, r, t in zip("qkv", leaves, ref_leaves, t_leaves):
        assert_2x_rule(ours.grad, t.grad, r.grad, f"grad {name} {what}", seed=rng_seed, slack=1e-5)
    # the log-sum-exp (natural log) of the inference forward, in float32 accuracy
    with torch.no_grad():
        _, lse = torch.ops.aiayn.attention_fwd(q, k, v, None, None, 0.0, causal, D ** -0.5, torch.tensor([0]))
        s = q.double() @ k.double().transpose(-1, -2) / D ** 0.5
        if causal:
            s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool).triu(1), float("-inf"))  # torch: top-left
        torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-4)
