"""Property-based fuzzing (hypothesis) of every registered op against its float64 reference.

Random shapes (1, and sizes that are not multiples of any vector or block width), layouts (column
slices, transposed views, stride-0 expanded inputs and masks), dtypes (float32, bfloat16, float64),
masks (key padding, bool and additive masks of every broadcast shape, causal, fully masked rows),
dropout on and off (compared exactly through the mask the call returns), every CPU ISA variant;
outputs and gradients by the 2x rule of conftest.

Reproducible: derandomize=True (examples are a fixed function of the test) and no example database.
AIAYN_FUZZ_EXAMPLES sets the examples per test (default 1000 per op; the sanitizer run uses fewer,
a long soak more). A failure prints the drawn case; the tensors come from a torch.Generator seeded
by the case, so the printed case alone reproduces it.
"""

import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aiayn
from aiayn import functional as AF
from aiayn import reference
from conftest import ISAS, assert_2x_rule

EXAMPLES = int(os.environ.get("AIAYN_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
# Relative slack of the 2x rule (times the reference's largest magnitude): where torch happens to be
# exact (one column, a constant row) our result may still be rounded once in the output dtype.
REL_SLACK = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3}

isas = st.sampled_from(ISAS)
dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**31 - 1)
dropout_seeds = st.integers(-(2**63), 2**63 - 1)
probabilities = st.one_of(st.just(0.0), st.sampled_from([0.1, 0.5, 1.0, 2.0**-32, 1.0 - 2.0**-20]),
                          st.floats(0.0, 1.0, allow_nan=False))
# Sizes around the vector widths (8, 16 lanes) and the attention blocks (64 keys, 96 query rows).
odd_sizes = st.sampled_from([1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 95, 97, 127, 129])


def check(ours, theirs, ref, what, seed, cond=1.0, mag=0.0):
    """The 2x rule with a slack relative to the reference's magnitude, in the result's dtype, times
    `cond`: how much the problem amplifies roundings (for float64 torch's result *is* the
    reference, so the slack alone bounds our error)."""
    ref = ref.double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    if not math.isfinite(scale):
        scale = 0.0
    scale = max(scale, mag)
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    slack = REL_SLACK[ours.dtype] * (1.0 + scale) * cond
    assert_2x_rule(ours, theirs, ref, what, slack=slack, seed=seed)


def layout(t, kind):
    """A view of a tensor with t's values in another memory layout."""
    if kind == "contiguous" or t.dim() == 0:
        return t
    if kind == "column_slice":  # rows strided past the last dim: t is a slice of a wider tensor
        wide = torch.empty(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
        wide[..., 1:-2] = t
        return wide[..., 1:-2]
    if kind == "transposed":  # last dim not contiguous (the op copies)
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t
    if kind == "leading_transposed":  # leading dims permuted, last dim contiguous
        return t.transpose(0, -2).contiguous().transpose(0, -2) if t.dim() >= 3 else t
    raise ValueError(kind)


layouts = st.sampled_from(["contiguous", "column_slice", "transposed", "leading_transposed"])


# --- dropout_mask ----------------------------------------------------------------------------


@FUZZ
@given(isa=isas, shape=st.lists(st.integers(0, 70), min_size=0, max_size=4).filter(
    lambda s: math.prod(s) <= 6000), p=probabilities, seed=dropout_seeds, dtype=dtypes,
    transposed=st.booleans())
def test_dropout_mask(isa, shape, p, seed, dtype, transposed):
    like = torch.empty(shape, dtype=dtype)
    if transposed and like.dim() >= 2:  # the mask follows the logical (row-major) order, not memory
        like = torch.empty(shape[:-2] + [shape[-1], shape[-2]], dtype=dtype).transpose(-1, -2)
    s = torch.tensor([seed], dtype=torch.int64)
    with aiayn.cpu_isa(isa):
        mask = AF.dropout_mask(like, p, s)
    assert mask.dtype == torch.bool and mask.shape == like.shape and mask.is_contiguous()
    want = reference.dropout_mask(tuple(shape), p, seed)
    assert torch.equal(mask, want), f"dropout_mask {isa} {shape} p={p} seed={seed}"


# --- add_dropout_layer_norm ------------------------------------------------------------------


@st.composite
def layer_norm_cases(draw):
    lead = draw(st.lists(st.one_of(st.integers(1, 6), st.just(0)), min_size=0, max_size=3))
    cols = draw(st.one_of(odd_sizes, st.integers(1, 300), st.sampled_from([511, 513, 1000])))
    if math.prod(lead) * cols > 6000:
        lead = [1] * len(lead)
    return dict(
        lead=lead, cols=cols, dtype=draw(dtypes), isa=draw(isas),
        wdtype=draw(st.sampled_from(["same", "float32", "none"])), bias=draw(st.booleans()),
        x_layout=draw(layouts), r_layout=draw(st.sampled_from(["contiguous", "column_slice", "transposed",
                                                                "leading_transposed", "expanded"])),
        p=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0])), eps=draw(st.sampled_from([1e-5, 1e-12, 0.1])),
        scale=draw(st.sampled_from([1.0, 1.0, 1e-3, 30.0])), offset=draw(st.sampled_from([0.0, 0.0, 100.0])),
        seed=draw(seeds), dropout_seed=draw(dropout_seeds), backward=draw(st.booleans()))


@FUZZ
@given(c=layer_norm_cases())
def test_add_dropout_layer_norm(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dtype, cols, shape = c["dtype"], c["cols"], tuple(c["lead"]) + (c["cols"],)
    bw = c["backward"]

    def rnd(shape, mag=1.0, offset=0.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * mag + offset).to(dtype)

    # Leaves in their own layout; the op sees (differentiable) views of them in the drawn layouts,
    # whose gradients autograd keeps (retain_grad) for the comparison.
    x_leaf = rnd(shape, c["scale"], c["offset"]).requires_grad_(bw)
    x = layout(x_leaf, c["x_layout"])
    if c["r_layout"] == "expanded" and len(shape) >= 2:  # residual broadcast over the leading dims
        r_leaf = rnd((1,) * (len(shape) - 1) + (cols,), c["scale"]).requires_grad_(bw)
        residual = r_leaf.expand(shape)
    else:
        r_leaf = rnd(shape, c["scale"]).requires_grad_(bw)
        residual = layout(r_leaf, c["r_layout"] if c["r_layout"] != "expanded" else "contiguous")
    wd = {"same": dtype, "float32": torch.float32, "none": None}[c["wdtype"]]
    w = None if wd is None else (1 + 0.5 * torch.randn(cols, generator=gen, dtype=torch.float64)).to(wd)
    b = None if wd is None or not c["bias"] else (0.5 * torch.randn(cols, generator=gen, dtype=torch.float64)).to(wd)
    w = None if w is None else w.requires_grad_(bw)
    b = None if b is None else b.requires_grad_(bw)
    ins = [x, residual, w, b]
    if bw:
        for t in ins[:2]:
            t.retain_grad()
    seed = torch.tensor([c["dropout_seed"]], dtype=torch.int64)
    p, eps = c["p"], c["eps"]
    with aiayn.cpu_isa(c["isa"]):
        out, mask = AF.add_dropout_layer_norm(*ins, p=p, eps=eps, seed=seed, return_dropout_mask=True)
        assert out.dtype == dtype and out.shape == shape
        assert torch.equal(mask, reference.dropout_mask(shape, p, seed)), "returned mask = reference mask"
        grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        if bw:
            out.backward(grad)

    def refs(dt):
        ls = [None if t is None else t.detach().to(torch.float64 if dt == torch.float64 else t.dtype)
              .contiguous().requires_grad_(bw) for t in ins]
        if dt != torch.float64 and ls[2] is not None and ls[2].dtype != dtype:
            # float32 affine with bf16 activations: torch's layer_norm in float32, rounded at the end
            h = ls[0].float() if p == 0 else ls[0].float() * mask * (0.0 if p >= 1 else 1 / (1 - p))
            o = torch.nn.functional.layer_norm(ls[1].float() + h, (cols,), ls[2], ls[3], eps).to(dtype)
        else:
            o = reference.add_dropout_layer_norm(*ls, p, eps, mask)
        if bw:
            o.backward(grad.to(o.dtype))
        return o, ls

    ref, ref_leaves = refs(torch.float64)
    theirs, their_leaves = refs(dtype)
    what = f"add_dropout_layer_norm {c}"
    # How much a rounding of the inputs moves the result: |residual + x| over sqrt(var + eps).
    h = ref_leaves[1].detach() + ref_leaves[0].detach()
    cond = ((h.abs().amax(-1) / (h.var(-1, unbiased=False) + eps).sqrt()).max().item()
            if h.numel() else 1.0)
    cond = max(1.0, min(cond, 1e8))  # with a few columns the two roundings of x + residual decide
    check(out, theirs, ref, what, c["seed"], cond)
    if bw:
        for name, ours, r, t in zip(("x", "residual", "weight", "bias"), ins, ref_leaves, their_leaves):
            if ours is None:
                continue
            assert ours.grad is not None and ours.grad.dtype == ours.dtype, f"grad {name}: {what}"
            check(ours.grad, t.grad, r.grad, f"grad {name}: {what}", c["seed"], cond)


# --- scaled_dot_product_attention --------------------------------------------------------------


@st.composite
def attention_cases(draw):
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    Lq = draw(st.one_of(st.integers(1, 5), st.integers(1, 40), odd_sizes))
    Lk = draw(st.one_of(st.just(Lq), st.integers(1, 5), st.integers(1, 40), odd_sizes, st.just(0)))
    D = draw(st.one_of(st.integers(1, 40), st.sampled_from([1, 3, 8, 16, 17, 33, 64, 80, 96, 100, 128, 256])))
    while B * H * max(Lq, 1) * max(Lk, 1) * D > 40000 or B * H * max(Lq, Lk) * D > 20000:
        B, H, Lq, Lk = max(1, B // 2), max(1, H - 1), max(1, (Lq * 2) // 3), (Lk * 2) // 3
    mask_kind = draw(st.sampled_from(["none", "bool", "float", "bool_expanded", "float_expanded"]))
    mask_shape = [draw(st.sampled_from([n, 1])) for n in (B, H, Lq, Lk)][4 - draw(st.integers(1, 4)):]
    return dict(
        B=B, H=H, Lq=Lq, Lk=Lk, D=D, dtype=draw(dtypes), isa=draw(isas),
        layout=draw(st.sampled_from(["contiguous", "fused_qkv", "transposed", "column_slice", "expanded"])),
        mask=mask_kind, mask_shape=mask_shape, float_mask_dtype=draw(st.sampled_from(["same", "float32", "float64"])),
        padding=draw(st.sampled_from(["none", "none", "random", "rows"])),
        dead=draw(st.booleans()), causal=draw(st.booleans()),
        p=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0])),
        scale=draw(st.sampled_from([None, None, 0.05, 1.0, -0.3, 0.0])),
        magnitude=draw(st.sampled_from([1.0, 1.0, 5.0])),
        seed=draw(seeds), dropout_seed=draw(dropout_seeds), backward=draw(st.booleans()))


def attention_inputs(c, gen):
    """(leaves, (q, k, v)): q, k, v are differentiable views of the leaves in the drawn layout."""
    B, H, Lq, Lk, D, dtype = c["B"], c["H"], c["Lq"], c["Lk"], c["D"], c["dtype"]
    bw, mag = c["backward"], c["magnitude"]

    def rnd(*shape, mag=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * mag).to(dtype).requires_grad_(bw)

    kind = c["layout"]
    if kind == "fused_qkv" and Lq == Lk:  # views of a (B, L, 3, H, D) projection
        qkv = rnd(B, Lq, 3, H, D, mag=mag)
        leaves = [qkv]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    elif kind == "expanded":  # k, v broadcast over the batch (stride 0), q's heads a slice
        leaves = [rnd(B, H + 1, Lq, D, mag=mag), rnd(1, H, Lk, D, mag=mag), rnd(1, H, Lk, D)]
        q, k, v = leaves[0][:, 1:], leaves[1].expand(B, H, Lk, D), leaves[2].expand(B, H, Lk, D)
    else:
        leaves = [rnd(B, H, Lq, D, mag=mag), rnd(B, H, Lk, D, mag=mag), rnd(B, H, Lk, D)]
        q, k, v = (layout(t, kind if kind != "fused_qkv" else "contiguous") for t in leaves)
    if bw:
        for t in (q, k, v):
            t.retain_grad()
    return q, k, v


def attention_masks(c, gen):
    B, Lk = c["B"], c["Lk"]
    attn_mask = kpm = None
    shape = c["mask_shape"]
    if c["mask"] != "none":
        small = [1 if c["mask"].endswith("expanded") else n for n in shape]
        if c["mask"].startswith("bool"):
            attn_mask = torch.rand(small, generator=gen) < 0.7
            if c["dead"] and attn_mask.dim() >= 2 and attn_mask.shape[-2] > 1:
                attn_mask[..., ::3, :] = False  # fully masked rows
        else:
            fd = {"same": c["dtype"], "float32": torch.float32, "float64": torch.float64}[c["float_mask_dtype"]]
            attn_mask = torch.randn(small, generator=gen, dtype=torch.float64)
            attn_mask[torch.rand(small, generator=gen) < 0.2] = float("-inf")
            if c["dead"] and attn_mask.dim() >= 2 and attn_mask.shape[-2] > 1:
                attn_mask[..., ::3, :] = float("-inf")
            attn_mask = attn_mask.to(fd)
        attn_mask = attn_mask.expand(shape)
    if c["padding"] != "none":
        kpm = torch.rand(B, Lk, generator=gen) < 0.3
        if c["padding"] == "rows":
            kpm[::2] = True  # whole batch entries padded: every row of them fully masked
    return attn_mask, kpm


@FUZZ
@given(c=attention_cases())
def test_scaled_dot_product_attention(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dtype = c["dtype"]
    q, k, v = attention_inputs(c, gen)
    attn_mask, kpm = attention_masks(c, gen)
    seed = torch.tensor([c["dropout_seed"]], dtype=torch.int64)
    p, causal, scale = c["p"], c["causal"], c["scale"]
    B, H, Lq, Lk, D = c["B"], c["H"], c["Lq"], c["Lk"], c["D"]

    with aiayn.cpu_isa(c["isa"]):
        out, keep = AF.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, key_padding_mask=kpm, dropout_p=p,
                                                    is_causal=causal, scale=scale, seed=seed,
                                                    return_dropout_mask=True)
        assert out.shape == (B, H, Lq, D) and out.dtype == dtype and out.is_contiguous()
        assert torch.equal(keep, reference.dropout_mask((B, H, Lq, Lk), p, seed)), "returned mask = reference mask"
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
        if c["backward"]:
            out.backward(grad)

    def refs(dt):
        ls = [t.detach().to(dt).requires_grad_(c["backward"]) for t in (q, k, v)]
        am = attn_mask
        if am is not None and am.dtype != torch.bool and dt == torch.float64:
            am = am.double()
        o = reference.scaled_dot_product_attention(*ls, am, kpm, p, causal, scale, keep)
        if c["backward"]:
            o.backward(grad.to(dt))
        return o, ls

    ref, ref_leaves = refs(torch.float64)
    theirs, their_leaves = refs(dtype)
    what = f"attention {c}"
    # The kernels recompute probabilities as exp(logit - logsumexp): an error of a few ulps of the
    # largest logit, where torch may be exact (a single key).
    logits = ref_leaves[0].detach() @ ref_leaves[1].detach().transpose(-1, -2)
    cond = 1.0 + (logits.abs().max().item() * abs(scale if scale is not None else 1 / math.sqrt(D)) / 4
                  if logits.numel() else 0.0)
    check(out, theirs, ref, what, c["seed"], cond)
    if c["backward"]:
        # dq and dk are sums of p * (dp - rowsum(dO * O)): terms of size |dO| |V| |K| scale that
        # cancel (exactly 0 for one key), rounded the way the flash backward rounds O.
        qa, ka, va = (t.detach().abs() for t in ref_leaves)
        sc = abs(scale if scale is not None else 1 / math.sqrt(D))
        dsa = grad.double().abs() @ va.transpose(-1, -2) * sc
        bounds = [(dsa @ ka).max().item() if dsa.numel() and Lk else 0.0,
                  (dsa.transpose(-1, -2) @ qa).max().item() if dsa.numel() and Lk else 0.0, 0.0]
        for name, ours, r, t, mag in zip("qkv", (q, k, v), ref_leaves, their_leaves, bounds):
            assert ours.grad is not None and ours.grad.dtype == dtype, f"grad {name}: {what}"
            check(ours.grad, t.grad, r.grad, f"grad {name}: {what}", c["seed"], cond, mag)


# --- linear and feed_forward ---------------------------------------------------------------------
# Fewer examples than the ops above (each is a few GEMMs): AIAYN_FUZZ_EXAMPLES scales them too.
GEMM_FUZZ = settings(FUZZ, max_examples=max(1, (EXAMPLES * 3) // 10))
# The forwards' GEMM path: by the number of rows (-1), forced onto the dot-product path straight from
# the weight's rows (1) or onto the packed weight (0).
gemm_paths = st.sampled_from([-1, 1, 0])
gemm_sizes = st.one_of(st.integers(1, 40), st.sampled_from([1, 3, 5, 7, 9, 15, 17, 31, 33, 47, 63, 65, 97, 129]))


def kink_free(shape_x, shape_w, n_bias, dtype, gen):
    """x, w, b whose pre-activations x wᵀ + b are exact in every dtype (dyadic grids: x = a/4,
    w = c/32 with |a|, |c| <= 8, b = (k + 1/2)/128), so float32/bfloat16 and the float64 reference
    take the same side of the ReLU (see tests/test_feed_forward.py's kink_free): a pre-activation
    within rounding of 0 would move gradients by O(1)."""
    x = (torch.randint(-8, 9, shape_x, generator=gen) / 4).to(dtype)
    w = (torch.randint(-8, 9, shape_w, generator=gen) / 32).to(dtype)
    b = ((torch.randint(-64, 65, (n_bias,), generator=gen) + 0.5) / 128).to(dtype)
    return x, w, b


# bf16 GEMM modes of the AVX-512 kernels (aiayn._C.set_gemm_bf16): widened, vdpbf16ps, AMX where supported.
bf16_modes = st.sampled_from([0, 1, 2] if aiayn._C.amx_supported() else [0, 1])


@st.composite
def linear_cases(draw):
    lead = draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))
    tokens, K, N = draw(gemm_sizes), draw(gemm_sizes), draw(gemm_sizes)
    while math.prod(lead) * tokens * K * N > 150000:
        lead, tokens = [1] * len(lead), max(1, tokens // 2)
    return dict(lead=lead, tokens=tokens, K=K, N=N, dtype=draw(dtypes), isa=draw(isas),
                bf16_mode=draw(bf16_modes), bias=draw(st.booleans()),
                activation=draw(st.sampled_from([None, "relu"])), x_layout=draw(layouts),
                w_layout=draw(st.sampled_from(["contiguous", "column_slice", "transposed"])),
                seed=draw(seeds), backward=draw(st.booleans()), rows_path=draw(gemm_paths))


def grads_of(fn, leaves, grad):
    """fn(*leaves) and the leaves' gradients for `grad` (float64 leaves are fresh copies)."""
    out = fn(*leaves)
    if grad is not None:
        out.backward(grad.to(out.dtype))
    return out


def gemm_compare(c, ins, our_out, call, grad, what):
    """Compares our output and input gradients with torch in ins' dtype and the float64 reference by
    the 2x rule; each entry's slack scales with the same problem on |inputs| (and |grad|), which
    bounds the terms a rounding error is relative to (cancellation in a sum)."""
    bw = grad is not None

    def leaves(dt, absolute=False):
        return [None if t is None else (t.detach().abs() if absolute else t.detach()).to(dt).contiguous()
                .requires_grad_(bw) for t in ins]

    ref_leaves, their_leaves, abs_leaves = leaves(torch.float64), leaves(c["dtype"]), leaves(torch.float64, True)
    ref = grads_of(call, ref_leaves, grad)
    theirs = grads_of(call, their_leaves, grad)
    bound = grads_of(lambda *a: call(*a, absolute=True), abs_leaves, None if grad is None else grad.abs())
    check(our_out, theirs, ref, what, c["seed"], mag=bound.abs().max().item() if bound.numel() else 0.0)
    if bw:
        for i, (ours, r, t, a) in enumerate(zip(ins, ref_leaves, their_leaves, abs_leaves)):
            if ours is None:
                continue
            assert ours.grad is not None and ours.grad.dtype == ours.dtype, f"grad {i}: {what}"
            mag = a.grad.abs().max().item() if a.grad is not None and a.grad.numel() else 0.0
            check(ours.grad, t.grad, r.grad, f"grad {i}: {what}", c["seed"], mag=mag)


@GEMM_FUZZ
@given(c=linear_cases())
def test_linear(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dtype, K, N, bw, act = c["dtype"], c["K"], c["N"], c["backward"], c["activation"]
    shape = tuple(c["lead"]) + (c["tokens"], K)
    if act == "relu":
        x0, w0, b0 = kink_free(shape, (N, K), N, dtype, gen)
    else:
        x0 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        w0 = (torch.randn(N, K, generator=gen, dtype=torch.float64) / math.sqrt(K)).to(dtype)
        b0 = (0.5 * torch.randn(N, generator=gen, dtype=torch.float64)).to(dtype)
    x_leaf, w_leaf = x0.requires_grad_(bw), w0.requires_grad_(bw)
    b = b0.requires_grad_(bw) if c["bias"] else None
    x, w = layout(x_leaf, c["x_layout"]), layout(w_leaf, c["w_layout"])
    if bw:
        x.retain_grad()
        w.retain_grad()
    grad = torch.randn(shape[:-1] + (N,), generator=gen, dtype=torch.float64).to(dtype) if bw else None
    previous = aiayn._C.set_gemm_bf16(c["bf16_mode"])
    previous_path = aiayn._C.set_gemm_rows_path(c["rows_path"])
    try:
        with aiayn.cpu_isa(c["isa"]):
            out = AF.linear(x, w, b, activation=act)
            assert out.dtype == dtype and out.shape == shape[:-1] + (N,)
            if bw:
                out.backward(grad)
    finally:
        aiayn._C.set_gemm_bf16(previous)
        aiayn._C.set_gemm_rows_path(previous_path)

    def call(x, w, b, absolute=False):
        return reference.linear(x, w, b, None if absolute else act)

    gemm_compare(c, [x, w, b], out, call, grad, f"linear {c}")


@st.composite
def feed_forward_cases(draw):
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    tokens, d_model, d_ff = draw(gemm_sizes), draw(gemm_sizes), draw(gemm_sizes)
    while math.prod(lead) * tokens * d_model * d_ff > 100000:
        lead, tokens = [1] * len(lead), max(1, tokens // 2)
    return dict(lead=lead, tokens=tokens, d_model=d_model, d_ff=d_ff, dtype=draw(dtypes), isa=draw(isas),
                bf16_mode=draw(bf16_modes), b1=draw(st.booleans()), b2=draw(st.booleans()),
                x_layout=draw(layouts), p=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0])),
                training=draw(st.sampled_from([True, True, False])),
                seed=draw(seeds), dropout_seed=draw(dropout_seeds), backward=draw(st.booleans()),
                rows_path=draw(gemm_paths))


@GEMM_FUZZ
@given(c=feed_forward_cases())
def test_feed_forward(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dtype, D, F, bw = c["dtype"], c["d_model"], c["d_ff"], c["backward"]
    shape = tuple(c["lead"]) + (c["tokens"], D)
    hidden_shape = shape[:-1] + (F,)
    x_leaf, w1, b1 = kink_free(shape, (F, D), F, dtype, gen)  # the ReLU's side is the same in every dtype
    w2 = (torch.randn(D, F, generator=gen, dtype=torch.float64) / math.sqrt(F)).to(dtype)
    b2 = (0.5 * torch.randn(D, generator=gen, dtype=torch.float64)).to(dtype)
    for t in (x_leaf, w1, w2):
        t.requires_grad_(bw)
    b1 = b1.requires_grad_(bw) if c["b1"] else None
    b2 = b2.requires_grad_(bw) if c["b2"] else None
    x = layout(x_leaf, c["x_layout"])
    if bw:
        x.retain_grad()
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) if bw else None
    seed = torch.tensor([c["dropout_seed"]], dtype=torch.int64)
    p = c["p"] if c["training"] else 0.0
    previous = aiayn._C.set_gemm_bf16(c["bf16_mode"])
    previous_path = aiayn._C.set_gemm_rows_path(c["rows_path"])
    try:
        with aiayn.cpu_isa(c["isa"]):
            out, mask = AF.feed_forward(x, w1, b1, w2, b2, dropout_p=c["p"], training=c["training"], seed=seed,
                                        return_dropout_mask=True)
            assert out.dtype == dtype and out.shape == shape
            assert torch.equal(mask, reference.dropout_mask(hidden_shape, p, seed)), "returned mask = reference mask"
            if bw:
                out.backward(grad)
    finally:
        aiayn._C.set_gemm_bf16(previous)
        aiayn._C.set_gemm_rows_path(previous_path)

    def call(x, w1, b1, w2, b2, absolute=False):
        if absolute:  # every unit active: bounds the terms of the real problem
            h = reference.linear(x, w1, b1).abs()
            if p > 0.0:
                h = h * mask.to(h.dtype) * (0.0 if p >= 1.0 else 1.0 / (1.0 - p))
            return reference.linear(h, w2, b2)
        return reference.feed_forward(x, w1, b1, w2, b2, p, mask)

    gemm_compare(c, [x, w1, b1, w2, b2], out, call, grad, f"feed_forward {c}")
