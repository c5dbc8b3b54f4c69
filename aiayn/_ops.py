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


# --- linear_int8 (inference only: no autograd) -----------------------------------------------


@torch.library.register_fake(f"{_lib}::linear_int8")
def _linear_int8_fake(x, w, w_scale, b, relu, w_packed=None):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=torch.float32)


@torch.library.register_fake(f"{_lib}::linear_int8_pack")
def _linear_int8_pack_fake(w):
    n, k = w.shape
    panels = (n + 15) // 16
    return w.new_empty((panels * 16 * ((k + 3) // 4 * 4 + 4),), dtype=torch.uint8)


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


# --- linear_cross_entropy ------------------------------------------------------------------


def _rows(x):
    rows = 1
    for s in x.shape[:-1]:
        rows = rows * s
    return rows


@torch.library.register_fake(f"{_lib}::linear_cross_entropy_fwd")
def _linear_cross_entropy_fwd_fake(x, weight, target, label_smoothing, ignore_index, reduction, compute_grad):
    acc = _acc_dtype(x)
    shape = target.shape if reduction == 0 else ()
    return (x.new_empty(shape, dtype=acc), x.new_empty(shape, dtype=acc), x.new_empty((_rows(x),), dtype=acc),
            x.new_empty(x.shape if compute_grad else (0,), dtype=acc),
            x.new_empty(weight.shape if compute_grad else (0,), dtype=acc))


@torch.library.register_fake(f"{_lib}::log_softmax_topk")
def _log_softmax_topk_fake(logits, k, exclude):
    shape = (*logits.shape[:-1], k)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int64)


@torch.library.register_fake(f"{_lib}::linear_cross_entropy_bwd")
def _linear_cross_entropy_bwd_fake(grad_loss, grad_nll, x, weight, target, lse, label_smoothing, ignore_index):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _linear_cross_entropy_setup(ctx, inputs, output):
    x, weight, target, label_smoothing, ignore_index, reduction, compute_grad = inputs
    _, _, lse, grad_x, grad_weight = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse, grad_x, grad_weight)
    ctx.args = (label_smoothing, ignore_index, reduction, compute_grad)
    ctx.dtypes = (x.dtype, weight.dtype)
    ctx.save_for_backward(x, weight, target, lse, grad_x, grad_weight)


def _linear_cross_entropy_backward(ctx, grad_loss, grad_nll, *_):
    x, weight, target, lse, grad_x, grad_weight = ctx.saved_tensors
    label_smoothing, ignore_index, reduction, compute_grad = ctx.args
    if grad_loss is None and grad_nll is None:
        return None, None, None, None, None, None, None
    if compute_grad and grad_nll is None:
        # The forward already holds the gradient of the reduced loss: scale it (float32, rounded
        # to the inputs' dtype once, here).
        gx = (grad_x * grad_loss).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        gw = (grad_weight * grad_loss).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None, None, None, None
    # Per-row output gradients: recompute the logits chunk by chunk from the saved lse.
    if reduction != 0:
        scale = 1.0
        if reduction == 1:
            scale = 1.0 / (target != ignore_index).sum().clamp_min(1)
        grad_loss = None if grad_loss is None else (grad_loss * scale).expand(target.shape)
        grad_nll = None if grad_nll is None else (grad_nll * scale).expand(target.shape)
    if grad_loss is None:
        grad_loss = torch.zeros(target.shape, dtype=lse.dtype, device=lse.device)
    gx, gw = torch.ops.aiayn.linear_cross_entropy_bwd(grad_loss, grad_nll, x, weight, target, lse, label_smoothing,
                                                      ignore_index)
    return gx, gw, None, None, None, None, None


torch.library.register_autograd(f"{_lib}::linear_cross_entropy_fwd", _linear_cross_entropy_backward,
                                setup_context=_linear_cross_entropy_setup)


def _linear_cross_entropy_fwd_chunked(x, weight, target, label_smoothing, ignore_index, reduction, compute_grad,
                                      chunk_bytes=64 << 20):
    """linear_cross_entropy_fwd in chunked pure PyTorch, for devices without a kernel of ours (CUDA:
    registered below, NOT YET RUN ON A GPU; the tests run it on CPU tensors against the reference).
    Same math as the CPU kernel: per chunk of rows the logits in the accumulation type, their
    log-sum-exp, the loss terms and, with compute_grad, dlogits consumed at once by dx and dW."""
    acc = _acc_dtype(x)
    d, V = x.shape[-1], weight.shape[0]
    xr, w, t = x.reshape(-1, d).to(acc), weight.to(acc), target.reshape(-1)
    bad = (t != ignore_index) & ((t < 0) | (t >= V))
    if bool(bad.any()):
        raise ValueError(f"linear_cross_entropy: argument 'target' holds {int(t[bad][0])}, outside "
                         f"[0, vocab_size={V}) and not ignore_index={ignore_index}")
    rows = xr.shape[0]
    valid = t != ignore_index
    count = int(valid.sum())
    scale = (1.0 / count if count else float("inf")) if reduction == 1 else 1.0
    chunk = max(1, min(rows, chunk_bytes // (4 * V)))
    loss_rows = x.new_empty((rows,), dtype=acc)
    nll_rows = x.new_empty((rows,), dtype=acc)
    lse = x.new_empty((rows,), dtype=acc)
    gx = torch.empty_like(xr) if compute_grad else x.new_empty((0,), dtype=acc)
    gw = torch.zeros_like(w) if compute_grad else x.new_empty((0,), dtype=acc)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        z = xr[r0:r1] @ w.t()
        v, ts = valid[r0:r1], t[r0:r1].masked_fill(~valid[r0:r1], 0)
        l = torch.logsumexp(z, 1)
        lse[r0:r1] = l
        nll = (l - z.gather(1, ts[:, None])[:, 0]).masked_fill(~v, 0)
        loss = nll
        if label_smoothing > 0:
            loss = (nll * (1 - label_smoothing) + (l - z.mean(1)) * label_smoothing).masked_fill(~v, 0)
        loss_rows[r0:r1], nll_rows[r0:r1] = loss, nll
        if compute_grad:
            coef = torch.where(v, scale, 0.0).to(acc)
            g = torch.exp(z - l[:, None]) * coef[:, None]
            g.scatter_add_(1, ts[:, None], (coef * -(1 - label_smoothing))[:, None])
            if label_smoothing > 0:
                g -= (coef * (label_smoothing / V))[:, None]
            g.masked_fill_(~v[:, None], 0)
            gx[r0:r1] = g @ w
            gw += g.t() @ xr[r0:r1]
    if reduction == 0:
        loss, nll = loss_rows.view(target.shape), nll_rows.view(target.shape)
    else:
        div = count if reduction == 1 else 1  # mean over no counted row: 0 / 0 = NaN, as torch
        loss, nll = ((r.double().sum() / div).to(acc) for r in (loss_rows, nll_rows))
    return loss, nll, lse, gx.view(x.shape) if compute_grad else gx, gw


def _linear_cross_entropy_bwd_chunked(grad_loss, grad_nll, x, weight, target, lse, label_smoothing, ignore_index,
                                      chunk_bytes=64 << 20):
    """linear_cross_entropy_bwd in chunked pure PyTorch (see _linear_cross_entropy_fwd_chunked)."""
    acc = _acc_dtype(x)
    d, V = x.shape[-1], weight.shape[0]
    xr, w, t = x.reshape(-1, d).to(acc), weight.to(acc), target.reshape(-1)
    valid = t != ignore_index
    a = torch.where(valid, grad_loss.reshape(-1).to(acc), 0.0)
    b = None if grad_nll is None else torch.where(valid, grad_nll.reshape(-1).to(acc), 0.0)
    rows = xr.shape[0]
    chunk = max(1, min(rows, chunk_bytes // (4 * V)))
    gx, gw = torch.empty_like(xr), torch.zeros_like(w)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        ac = a[r0:r1]
        bc = None if b is None else b[r0:r1]
        ts = t[r0:r1].masked_fill(~valid[r0:r1], 0)
        g = torch.exp(xr[r0:r1] @ w.t() - lse[r0:r1, None]) * (ac if bc is None else ac + bc)[:, None]
        hot = ac * -(1 - label_smoothing) - (0 if bc is None else bc)
        g.scatter_add_(1, ts[:, None], hot[:, None])
        if label_smoothing > 0:
            g -= (ac * (label_smoothing / V))[:, None]
        g.masked_fill_(~valid[r0:r1, None], 0)
        gx[r0:r1] = g @ w
        gw += g.t() @ xr[r0:r1]
    return gx.view(x.shape).to(x.dtype), gw.to(weight.dtype)


# CUDA: the chunked PyTorch version above (no kernel of ours yet; unverified on a GPU).
torch.library.register_kernel(f"{_lib}::linear_cross_entropy_fwd", "cuda", _linear_cross_entropy_fwd_chunked)
torch.library.register_kernel(f"{_lib}::linear_cross_entropy_bwd", "cuda", _linear_cross_entropy_bwd_chunked)


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
