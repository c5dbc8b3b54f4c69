"""Pure-PyTorch references: the documented meaning of every aiayn op. The tests compare the
compiled kernels with these (run in float64), and they run anywhere torch runs."""

import torch
import torch.nn.functional as F

__all__ = ["philox4x32_10", "dropout_mask", "add_dropout_layer_norm", "linear", "feed_forward",
           "scaled_dot_product_attention", "linear_cross_entropy", "log_softmax_topk", "quantize_weight_int8",
           "quantize_rows_int8", "linear_int8_accumulators", "linear_int8"]

import math

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., SC'11) on int64 tensors holding uint32 values.

    counter: (..., 4), key: (..., 2); returns (..., 4). Matches csrc/common/philox.h.
    """
    c = [counter[..., i].to(torch.int64) for i in range(4)]
    k0, k1 = key[..., 0].to(torch.int64), key[..., 1].to(torch.int64)
    for r in range(10):
        if r > 0:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c[0])
        hi1, lo1 = _mulhilo(_M1, c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return torch.stack(c, dim=-1)


def _mulhilo(m, x):
    # 32x32 -> 64-bit product without overflowing int64: split x into 16-bit halves.
    xl, xh = x & 0xFFFF, x >> 16
    lo_part = m * xl  # < 2^48
    hi_part = m * xh  # < 2^48
    total_lo = (lo_part & _MASK32) + ((hi_part & 0xFFFF) << 16)
    lo = total_lo & _MASK32
    hi = ((lo_part >> 32) + (hi_part >> 16) + (total_lo >> 32)) & _MASK32
    return hi, lo


def dropout_mask(shape, p, seed, device=None):
    """The keep-mask of aiayn's dropout: element i (row-major) is kept iff word i % 4 of
    Philox4x32-10(counter = (i // 4, 0), key = seed) is >= floor(p * 2^32); nothing is kept at p = 1."""
    n = 1
    for s in shape:
        n *= s
    seed = int(seed.item()) if torch.is_tensor(seed) else int(seed)
    if p <= 0.0 or n == 0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if p >= 1.0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    threshold = min(int(p * 4294967296.0), _MASK32)
    counters = torch.arange((n + 3) // 4, dtype=torch.int64)
    ctr = torch.stack([counters & _MASK32, counters >> 32, torch.zeros_like(counters), torch.zeros_like(counters)], -1)
    key = torch.tensor([seed & _MASK32, (seed >> 32) & _MASK32], dtype=torch.int64).expand(len(counters), 2)
    words = philox4x32_10(ctr, key).reshape(-1)[:n]
    return (words >= threshold).reshape(shape).to(device)


def add_dropout_layer_norm(x, residual, weight=None, bias=None, p=0.0, eps=1e-5, keep_mask=None):
    """``LayerNorm(residual + dropout(x))`` over the last dim; dropout given by ``keep_mask``
    (bool, x's shape) with kept values scaled by 1 / (1 - p). Computed in x's dtype."""
    h = x
    if keep_mask is not None and p > 0.0:
        scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
        h = x * keep_mask.to(x.dtype) * scale
    return F.layer_norm(residual + h, (x.shape[-1],), weight, bias, eps)


def linear(x, w, b=None, activation=None):
    """``act(x @ w.T + b)`` with ``act`` = identity or ReLU. Computed in x's dtype."""
    out = F.linear(x, w, b)
    return torch.relu(out) if activation == "relu" else out


def quantize_weight_int8(w):
    """Symmetric per-output-channel int8 weights: ``(w_q, scale)`` with ``scale = max|w_row| / 127``
    (1 for an all-zero row, so dequantizing never divides by 0) and ``w_q = round(w / scale)`` in
    [-127, 127]; ``w ~= w_q * scale[:, None]``. Computed in float64, stored as int8 / float32."""
    w64 = w.detach().to(torch.float64)
    amax = w64.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(torch.float32)
    w_q = torch.round(w64 / scale.to(torch.float64)[:, None]).clamp_(-127, 127).to(torch.int8)
    return w_q, scale


def quantize_rows_int8(x):
    """The on-the-fly activation quantization of ``linear_int8``, per row of ``x`` (float32):
    ``(q, scale)``, ``scale = max|x_row| / 127`` and ``q = round-half-even(x * (127 / max|x_row|))``
    in [-127, 127] (int32), each a float32 operation as in the kernels. A zero row gets scale 0 and
    q = 0; a row holding inf or NaN gets scale NaN (its outputs are NaN) and q = 0."""
    x = x.to(torch.float32)
    amax = x.abs().amax(dim=-1) if x.shape[-1] else x.new_zeros(x.shape[:-1])
    finite = torch.isfinite(x).all(dim=-1)
    c127 = torch.full_like(amax, 127.0)  # tensor operands: `127.0 / t` is t.reciprocal() * 127 in torch
    inv = torch.where(finite & (amax > 0), c127 / amax, torch.zeros_like(amax))
    q = torch.round(x * inv[..., None]).clamp_(-127, 127)
    q = torch.where(finite[..., None], q, torch.zeros_like(q)).to(torch.int32)
    scale = torch.where(finite, amax / c127, torch.full_like(amax, float("nan")))
    return q, scale


def linear_int8_accumulators(x, w):
    """The exact int32 sums ``q(x) @ w^T`` of ``linear_int8`` (computed in int64) and the row scales."""
    q, xs = quantize_rows_int8(x)
    return q.to(torch.int64) @ w.to(torch.int64).T, xs


def linear_int8(x, w, w_scale, b=None, activation=None):
    """int8 linear: ``act(float(acc) * (x_scale * w_scale) + b)``, ``acc`` the int32 sums of the
    quantized rows of ``x`` with ``w`` (int8, per output channel scales ``w_scale``); float32 out.
    Bit for bit what aiayn.functional.linear_int8 computes."""
    acc, xs = linear_int8_accumulators(x, w)
    out = acc.to(torch.float32) * (xs[..., None] * w_scale.to(torch.float32))
    if b is not None:
        out = out + b.to(torch.float32)
    return torch.relu(out) if activation == "relu" else out


def feed_forward(x, w1, b1, w2, b2, p=0.0, keep_mask=None):
    """``dropout(relu(x w1^T + b1)) w2^T + b2``, dropout given by ``keep_mask`` (bool, shape
    ``(..., d_ff)``) with kept values scaled by 1 / (1 - p). Computed in x's dtype."""
    h = torch.relu(F.linear(x, w1, b1))
    if keep_mask is not None and p > 0.0:
        scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
        h = h * keep_mask.to(h.dtype) * scale
    return F.linear(h, w2, b2)


def linear_cross_entropy(x, weight, target, label_smoothing=0.0, ignore_index=-100, reduction="mean",
                         return_nll=False):
    """``F.cross_entropy(x @ weight.T, target, ...)`` over x's leading dims, materialising the
    logits, computed in x's dtype (torch's label-smoothing convention, §5.4: ``(1 - eps) nll + eps
    mean_j(-log p_j)``). ``return_nll``: also the unsmoothed loss, same reduction. Results shaped
    like ``target`` for ``reduction="none"``."""
    logits = F.linear(x, weight).reshape(-1, weight.shape[0])
    t = target.reshape(-1)

    def ce(eps):
        out = F.cross_entropy(logits, t, ignore_index=ignore_index, label_smoothing=eps, reduction=reduction)
        return out.view(target.shape) if reduction == "none" else out

    loss = ce(label_smoothing)
    return (loss, ce(0.0)) if return_nll else loss


def scaled_dot_product_attention(q, k, v, attn_mask=None, key_padding_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, keep_mask=None):
    """``softmax(q kᵀ · scale + mask) v`` (paper §3.2.1) materialising the scores, in q's dtype.
    Masks as in ``aiayn.functional.scaled_dot_product_attention``; dropout given by ``keep_mask``
    (bool, ``(B, H, Lq, Lk)``). A row with every key masked gives zeros."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    visible = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if is_causal:
        visible = visible.tril()
    visible = visible.expand(s.shape)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            s = s + attn_mask.to(s.dtype)
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, :]
    s = s.masked_fill(~visible, float("-inf"))
    if Lk == 0:  # no keys: every row is fully masked (zeros), and amax has nothing to reduce
        return s @ v
    row_max = s.amax(-1, keepdim=True)
    dead = torch.isneginf(row_max)
    p = torch.exp(s - torch.where(dead, torch.zeros_like(row_max), row_max))
    denom = p.sum(-1, keepdim=True)
    p = torch.where(dead, torch.zeros_like(p), p / torch.where(dead, torch.ones_like(denom), denom))
    if keep_mask is not None and dropout_p > 0.0:
        p = p * keep_mask.to(p.dtype) * (0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p))
    return p @ v


def log_softmax_topk(logits, k, exclude=()):
    """``log_softmax(logits.float())`` with the ``exclude`` columns set to -inf afterwards, then its
    ``k`` largest entries and their indices (-inf slots get index -1; a row without a finite logit
    is all -inf): beam search's scoring of a step as torch writes it (aiayn 0.1's decoding.py)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    logp = logp.masked_fill(logp.isnan(), float("-inf"))  # a row of -inf logits: nothing to choose
    if len(exclude):
        logp[..., list(exclude)] = float("-inf")
    values, indices = logp.topk(k, dim=-1)
    return values, indices.masked_fill(values == float("-inf"), -1)
