"""Which implementation the modules run: aiayn's compiled ops where a kernel exists for the
tensors' device, PyTorch's own ops otherwise (or everywhere, inside :func:`reference_ops`, which the
tests use to build the same model on the reference ops)."""

import contextlib

import torch
import torch.nn.functional as F

from .. import functional as AF
from .. import reference

__all__ = ["reference_ops", "uses_compiled_ops", "linear", "feed_forward", "attention", "attention_weights",
           "add_dropout_layer_norm"]

_reference_forced = False


@contextlib.contextmanager
def reference_ops(enabled=True):
    """Run every aiayn module on the pure-PyTorch reference ops inside this block (same semantics;
    the dropout masks differ, being drawn by ``torch.nn.functional.dropout``)."""
    global _reference_forced
    before, _reference_forced = _reference_forced, enabled
    try:
        yield
    finally:
        _reference_forced = before


_OPS = {"linear": "linear_fwd", "feed_forward": "feed_forward_fwd", "attention": "attention_fwd",
        "add_dropout_layer_norm": "add_dropout_layer_norm_fwd"}
# Read once at import (the kernels register when aiayn._C loads), so that torch.compile never has
# to trace the dispatcher query.
_HAS_KERNEL = {(device, op): torch._C._dispatch_has_kernel_for_dispatch_key(f"aiayn::{name}", key)
               for device, key in (("cpu", "CPU"), ("cuda", "CUDA")) for op, name in _OPS.items()}


def uses_compiled_ops(device, op=None):
    """Whether the modules run aiayn's kernel of ``op`` (every op when None) for tensors on
    ``device``: a kernel is registered for the device's dispatch key (CPU always; CUDA for the ops
    whose CUDA sources were built). Ops without one run on PyTorch's own."""
    if _reference_forced:
        return False
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if op is None:
        return all(_HAS_KERNEL.get((device_type, name), False) for name in _OPS)
    return _HAS_KERNEL.get((device_type, op), False)


def linear(x, w, b=None, activation=None):
    if uses_compiled_ops(x.device, "linear"):
        return AF.linear(x, w, b, activation)
    return reference.linear(x, w, b, activation)


def feed_forward(x, w1, b1, w2, b2, dropout_p, training):
    if uses_compiled_ops(x.device, "feed_forward"):
        return AF.feed_forward(x, w1, b1, w2, b2, dropout_p, training)
    h = F.dropout(torch.relu(F.linear(x, w1, b1)), dropout_p, training)
    return F.linear(h, w2, b2)


def add_dropout_layer_norm(x, residual, weight, bias, p, eps, training):
    """``LayerNorm(residual + dropout(x))``: the post-LN sub-layer connection (§3.1, §5.4)."""
    if uses_compiled_ops(x.device, "add_dropout_layer_norm"):
        return AF.add_dropout_layer_norm(x, residual, weight, bias, p, eps, training)
    return F.layer_norm(residual + F.dropout(x, p, training), (x.shape[-1],), weight, bias, eps)


def attention(q, k, v, attn_mask=None, key_padding_mask=None, dropout_p=0.0, is_causal=False, training=True):
    """Scaled dot-product attention (§3.2.1) over ``(B, H, L, d_k)`` views; masks with
    :func:`aiayn.functional.scaled_dot_product_attention`'s conventions."""
    if uses_compiled_ops(q.device, "attention"):
        return AF.scaled_dot_product_attention(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal,
                                               training=training)
    if training and dropout_p > 0.0:
        out, _ = attention_weights(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, training)
        return out
    return reference.scaled_dot_product_attention(q, k, v, attn_mask, key_padding_mask, 0.0, is_causal)


def attention_weights(q, k, v, attn_mask=None, key_padding_mask=None, dropout_p=0.0, is_causal=False,
                      training=True):
    """The materialising path: returns ``(out, weights)``, weights ``(B, H, Lq, Lk)`` being the
    attention probabilities before dropout (zeros on a fully masked row)."""
    Lk = k.shape[-2]
    eye = torch.eye(Lk, dtype=q.dtype, device=q.device).expand(*q.shape[:-2], Lk, Lk)
    # The reference op with v = identity returns exactly the probability matrix.
    weights = reference.scaled_dot_product_attention(q, k, eye, attn_mask, key_padding_mask, 0.0, is_causal)
    return F.dropout(weights, dropout_p, training) @ v, weights
