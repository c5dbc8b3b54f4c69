"""Fake (meta) kernels and autograd for the ops registered in csrc/aiayn.cpp, so that
torch.library.opcheck passes and torch.compile(fullgraph=True) traces calls without graph breaks.
The backward of every op is itself an op."""

import contextlib

import torch

from . import _C

_lib = "aiayn"


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --- add_dropout_layer_norm ------------------------------------------------------------------


@torch.library.register_fake(f"{_lib}::add_dropout_layer_norm_fwd")
def _add_dropout_layer_norm_fwd_fake(x, residual, weight, bias, p, eps, seed):
    rows = x.numel() // x.shape[-1] if x.shape[-1] != 0 else 0
    acc = _acc_dtype(x)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((rows,), dtype=acc), x.new_empty((rows,), dtype=acc))


@torch.library.register_fake(f"{_lib}::add_dropout_layer_norm_bwd")
def _add_dropout_layer_norm_bwd_fake(grad_out, x, residual, weight, mean, rstd, p, seed):
    wdtype = weight.dtype if weight is not None else _acc_dtype(x)
    cols = x.shape[-1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((cols,), dtype=wdtype), x.new_empty((cols,), dtype=wdtype))


def _add_dropout_layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, p, eps, seed = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, mean, rstd, seed)
    ctx.p = p
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None


def _add_dropout_layer_norm_backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, residual, weight, mean, rstd, seed = ctx.saved_tensors
    gx, gr, gw, gb = torch.ops.aiayn.add_dropout_layer_norm_bwd(grad_out, x, residual, weight, mean, rstd, ctx.p, seed)
    return gx, gr, gw if ctx.has_weight else None, gb if ctx.has_bias else None, None, None, None


torch.library.register_autograd(f"{_lib}::add_dropout_layer_norm_fwd", _add_dropout_layer_norm_backward,
                                setup_context=_add_dropout_layer_norm_setup)


# --- attention ------------------------------------------------------------------------------


@torch.library.register_fake(f"{_lib}::attention_fwd")
def _attention_fwd_fake(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, float_out=False):
    B, H, Lq, D = q.shape
    out_dtype = torch.float32 if float_out and q.dtype in (torch.bfloat16, torch.float16) else q.dtype
    return q.new_empty((B, H, Lq, D), dtype=out_dtype), q.new_empty((B, H, Lq), dtype=_acc_dtype(q))


@torch.library.register_fake(f"{_lib}::attention_bwd")
def _attention_bwd_fake(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, *_ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, key_padding_mask, seed)
    ctx.args = (dropout_p, is_causal, scale)


def _attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, attn_mask, key_padding_mask, seed = ctx.saved_tensors
    dropout_p, is_causal, scale = ctx.args
    # With float_out the output (so its gradient) is float32; the kernel takes dO in q's dtype.
    gq, gk, gv = torch.ops.aiayn.attention_bwd(grad_out.to(q.dtype), q, k, v, out, lse, attn_mask, key_padding_mask,
                                               dropout_p, is_causal, scale, seed)
    return gq, gk, gv, None, None, None, None, None, None, None


torch.library.register_autograd(f"{_lib}::attention_fwd", _attention_backward, setup_context=_attention_setup)


# --- dropout_mask ----------------------------------------------------------------------------


@torch.library.register_fake(f"{_lib}::dropout_mask")
def _dropout_mask_fake(like, p, seed):
    return torch.empty_like(like, dtype=torch.bool, memory_format=torch.contiguous_format)


# --- linear ----------------------------------------------------------------------------------


@torch.library.register_fake(f"{_lib}::linear_fwd")
def _linear_fwd_fake(x, w, b, relu):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.register_fake(f"{_lib}::linear_bwd")
def _linear_bwd_fake(grad_out, x, w, out, relu):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(w, memory_format=torch.contiguous_format), w.new_empty((w.shape[0],)))


def _linear_setup(ctx, inputs, output):
    x, w, b, relu = inputs
    ctx.relu = relu
    ctx.has_bias = b is not None
    ctx.save_for_backward(x, w, output if relu else None)


def _linear_backward(ctx, grad_out):
    x, w, out = ctx.saved_tensors
    gx, gw, gb = torch.ops.aiayn.linear_bwd(grad_out.contiguous(), x, w, out, ctx.relu)
    return gx, gw, gb if ctx.has_bias else None, None


torch.library.register_autograd(f"{_lib}::linear_fwd", _linear_backward, setup_context=_linear_setup)


# --- feed_forward ----------------------------------------------------------------------------


def relu_mask_row_bytes(d_ff):
    """Bytes per token of feed_forward's CUDA ReLU bit-mask (csrc/common/relu_mask.h): d_ff bits
    rounded up to cuBLASLt's multiple of 128."""
    return (d_ff + 127) // 128 * 16


@torch.library.register_fake(f"{_lib}::feed_forward_fwd")
def _feed_forward_fwd_fake(x, w1, b1, w2, b2, p, seed):
    mask_shape = (*x.shape[:-1], relu_mask_row_bytes(w1.shape[0])) if x.device.type == "cuda" else (0,)
    return x.new_empty(x.shape), x.new_empty((*x.shape[:-1], w1.shape[0])), x.new_empty(mask_shape, dtype=torch.uint8)


@torch.library.register_fake(f"{_lib}::feed_forward_bwd")
def _feed_forward_bwd_fake(grad_out, x, w1, w2, hidden, p, relu_mask=None):
    return (x.new_empty(x.shape), w1.new_empty(w1.shape), w1.new_empty((w1.shape[0],)),
            w2.new_empty(w2.shape), w2.new_empty((w2.shape[0],)))


def _feed_forward_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, p, seed = inputs
    _, hidden, relu_mask = output
    # No zero-filled gradients for the outputs nobody differentiates (hidden: T x d_ff).
    ctx.set_materialize_grads(False)
    ctx.p = p
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
    ctx.save_for_backward(x, w1, w2, hidden, relu_mask)


def _feed_forward_backward(ctx, grad_out, _grad_hidden, _grad_mask):
    # The hidden output is an internal activation (saved for the backward); its gradient is not
    # supported, and it is marked non-differentiable by the functional wrapper's use. The bit-mask
    # (CUDA) is the backward's ReLU-and-dropout gate.
    x, w1, w2, hidden, relu_mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    gx, gw1, gb1, gw2, gb2 = torch.ops.aiayn.feed_forward_bwd(grad_out, x, w1, w2, hidden, ctx.p, relu_mask)
    return gx, gw1, gb1 if ctx.has_b1 else None, gw2, gb2 if ctx.has_b2 else None, None, None


torch.library.register_autograd(f"{_lib}::feed_forward_fwd", _feed_forward_backward,
                                setup_context=_feed_forward_setup)


# --- helpers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def cpu_isa(name):
    """Run the CPU kernels of the block with the ISA variant `name` ("avx512", "avx2", "generic");
    raises ValueError where this CPU cannot run it. Process-wide: not for concurrent use."""
    previous = _C.cpu_isa()
    try:
        _C.set_cpu_isa(name)
    except Exception as e:  # pybind maps std::invalid_argument to ValueError
        raise ValueError(str(e)) from None
    try:
        yield
    finally:
        _C.set_cpu_isa(previous)


@contextlib.contextmanager
def packed_weight_cache(enabled=True):
    """Within the block, linear / feed_forward keep the packed (GEMM panel) copy of each weight and
    reuse it while ``w._version`` is unchanged: weights are packed once per optimizer step (any
    in-place update bumps the version) instead of once per call. Writes through ``w.data`` do not
    bump the version and are not seen: do not use it around code that writes weights that way
    (e.g. torch.autograd.gradcheck). Also settable process-wide with ``AIAYN_PACK_CACHE=1``.
    Process-wide: not for concurrent use. ``with packed_weight_cache() as was_on`` tells whether the
    cache was on before."""
    previous = _C.set_pack_cache(bool(enabled))
    try:
        yield previous
    finally:
        _C.set_pack_cache(previous)
