"""Multi-head attention (Vaswani et al., 2017, §3.2.2) on aiayn's attention op, and the key/value
cache of incremental decoding."""

import torch
import torch.nn as nn

from . import backend

__all__ = ["MultiHeadAttention", "KVCache"]


class KVCache:
    """Keys and values of one attention module during incremental decoding, handed to attention as
    ``(N, H, L, d_k)`` views.

    Self-attention appends each step's keys/values into buffers laid out ``(capacity, N, H, d_k)``
    that grow by doubling; the attention op reads the filled prefix through a permuted view (it
    takes any strides with a contiguous last dim), without a copy. Position-major, the filled prefix
    is one contiguous block, so ``reorder(index)`` (beam search's choice of hypotheses) is one
    gather of whole ``H * d_k`` rows into a second buffer kept for that (the two swap roles): it
    neither allocates nor touches the unfilled capacity. Against a fresh ``index_select`` of the
    whole ``(N, H, capacity, d_k)`` buffers per step (aiayn 0.1), 4-35x faster for N 128, H 4, d_k
    64 and 10-40 cached positions (Zen 4, 2 threads; a fresh multi-MB tensor per step mostly costs
    its page faults).
    Cross-attention stores the encoder output's keys/values ``(N, H, S, d_k)`` once (``static``)."""

    def __init__(self):
        self.k = self.v = None
        self.length = 0
        self.static = False
        self._spare = None  # (k, v) buffers reorder gathers into

    def append(self, k, v):
        n, h, t, d = k.shape
        if self.k is None:
            self.k = k.new_empty((max(2 * t, 16), n, h, d))
            self.v = v.new_empty((max(2 * t, 16), n, h, d))
        else:
            self.reserve(t)
        self.k[self.length:self.length + t] = k.permute(2, 0, 1, 3)
        self.v[self.length:self.length + t] = v.permute(2, 0, 1, 3)
        self.length += t
        return self.keys_values()

    def reserve(self, t):
        """Room for ``t`` more positions after the filled ones (the buffers double when full);
        for a writer that fills them itself (the C++ decoder step), then advances ``length``."""
        if self.length + t > self.k.shape[0]:
            capacity = max(2 * self.k.shape[0], self.length + t)
            grown = [x.new_empty((capacity, *x.shape[1:])) for x in (self.k, self.v)]
            grown[0][:self.length] = self.k[:self.length]
            grown[1][:self.length] = self.v[:self.length]
            self.k, self.v = grown
            self._spare = None

    def keys_values(self):
        """The cached ``(N, H, L, d_k)`` keys and values (views)."""
        if self.static:
            return self.k, self.v
        return self.k[:self.length].permute(1, 2, 0, 3), self.v[:self.length].permute(1, 2, 0, 3)

    def set_static(self, k, v):
        self.k, self.v, self.length, self.static = k, v, k.shape[2], True
        return k, v

    def reorder(self, index):
        if self.k is None:
            return
        if self.static:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)
            return
        shape = (self.k.shape[0], index.numel(), *self.k.shape[2:])
        if self._spare is None or self._spare[0].shape != shape:
            self._spare = (self.k.new_empty(shape), self.v.new_empty(shape))
        k, v = self._spare
        filled = slice(0, self.length)
        torch.index_select(self.k[filled], 1, index, out=k[filled])
        torch.index_select(self.v[filled], 1, index, out=v[filled])
        self._spare = (self.k, self.v) if self.k.shape == shape else None
        self.k, self.v = k, v


class MultiHeadAttention(nn.Module):
    """``MultiHead(Q, K, V) = Concat(head_1..head_h) W^O``, ``head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)``
    (Vaswani et al., 2017, §3.2.2), batch-first ``(B, L, d_model)``.

    The h projections are one ``(3 d_model, d_model)`` matrix (``in_proj_weight``, laid out as
    ``nn.MultiheadAttention``'s: rows for Q, then K, then V), so self-attention is one GEMM whose output
    is viewed as ``(B, L, 3, h, d_k)`` and handed to the attention op as strided ``(B, h, L, d_k)``
    views, without copies. ``dropout`` is on the attention probabilities (not in the paper; 0 by
    default in the Transformer).
    """

    # aiayn.quantize(model, "int8") sets this on the instance and replaces the projections by
    # Int8Linear modules (``in_proj``, ``out_proj``); a class attribute, so the float path pays one
    # attribute read.
    int8 = False
    # int8 models: the dtype attention runs in (queries, cached keys/values), None = the projections'
    # float32. bf16 halves the caches' bytes (their appends, beam reorders and reads).
    int8_attention_dtype = None

    def __init__(self, d_model, num_heads, dropout=0.0, bias=True, device=None, dtype=None):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"MultiHeadAttention: d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        factory = dict(device=device, dtype=dtype)
        self.d_model, self.num_heads, self.d_k, self.dropout = d_model, num_heads, d_model // num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model, **factory)) if bias else None
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def _project(self, x, first, count):
        """x W^T + b for rows [first, first + count) * d_model of the packed projection, viewed as
        ``count`` tensors ``(B, h, L, d_k)``."""
        d = self.d_model
        B, L, _ = x.shape
        if self.int8:
            y = self.in_proj(x, first=first * d, count=count * d)
            if self.int8_attention_dtype is not None:
                y = y.to(self.int8_attention_dtype)
            return y.view(B, L, count, self.num_heads, self.d_k).permute(2, 0, 3, 1, 4).unbind(0)
        if first == 0 and count == 3:
            # The whole packed projection: the parameters themselves, since the backward of a
            # slice zero-fills a gradient of the full parameter and copies into it.
            w, b = self.in_proj_weight, self.in_proj_bias
        else:
            w = self.in_proj_weight[first * d:(first + count) * d]
            b = None if self.in_proj_bias is None else self.in_proj_bias[first * d:(first + count) * d]
        y = backend.linear(x, w, b)
        return y.view(B, L, count, self.num_heads, self.d_k).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, query, key=None, value=None, key_padding_mask=None, attn_mask=None, is_causal=False,
                need_weights=False, cache=None):
        """Attend from ``query`` ``(B, Lq, d_model)`` to ``key``/``value`` ``(B, Lk, d_model)``
        (self-attention when ``key`` is None).

        Masks follow :func:`aiayn.functional.scaled_dot_product_attention`: ``key_padding_mask``
        ``(B, Lk)`` True = padding; ``attn_mask`` bool True = takes part, or float added to the
        scores; ``is_causal`` lets query i see keys j <= i.

        ``cache``: a :class:`KVCache` for incremental decoding: self-attention appends this call's
        keys/values and attends to everything cached (query i of this call sits at position
        ``cache.length + i``); cross-attention projects ``key``/``value`` on the first call only.
        ``need_weights=True`` returns ``(out, weights)`` with the per-head probabilities
        ``(B, h, Lq, Lk)``, computed on the materialising reference path (for plots).
        """
        self_attention = key is None
        if self_attention:
            past = cache.length if cache is not None else 0
            q, k, v = self._project(query, 0, 3)
            if cache is not None:
                k, v = cache.append(k, v)
                if is_causal and past > 0 and q.shape[2] == 1:
                    is_causal = False  # one query after the cache sees every cached key: no mask
                elif is_causal and past > 0:
                    # Queries sit after the cached keys: causal alignment is bottom-right.
                    Lq, Lk = q.shape[2], k.shape[2]
                    rows = torch.arange(Lq, device=q.device)[:, None] + past
                    allowed = torch.arange(Lk, device=q.device)[None, :] <= rows
                    attn_mask = allowed if attn_mask is None else _and_masks(attn_mask, allowed)
                    is_causal = False
        else:
            (q,) = self._project(query, 0, 1)
            if cache is not None and cache.static:
                k, v = cache.k, cache.v
            else:
                if value is None or value is key:
                    k, v = self._project(key, 1, 2)
                else:
                    (k,) = self._project(key, 1, 1)
                    (v,) = self._project(value, 2, 1)
                if cache is not None:
                    cache.set_static(k, v)
        p = self.dropout if self.training else 0.0
        if need_weights:
            out, weights = backend.attention_weights(q, k, v, attn_mask, key_padding_mask, p, is_causal, self.training)
        else:
            out = backend.attention(q, k, v, attn_mask, key_padding_mask, p, is_causal, self.training)
        B, H, Lq, dk = out.shape
        out = out.transpose(1, 2).reshape(B, Lq, H * dk)
        out = self.out_proj(out) if self.int8 else backend.linear(out, self.out_proj.weight, self.out_proj.bias)
        return (out, weights) if need_weights else out


def _and_masks(attn_mask, allowed):
    if attn_mask.dtype == torch.bool:
        return attn_mask & allowed
    return attn_mask.masked_fill(~allowed, float("-inf"))
