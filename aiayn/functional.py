"""The public functional API. Each function's docstring is the op's contract; aiayn.reference
holds the pure-PyTorch definition of the same semantics, used by the tests."""

import torch

__all__ = ["add_dropout_layer_norm", "dropout_mask", "feed_forward", "linear", "linear_cross_entropy",
           "linear_int8", "linear_int8_pack", "log_softmax_topk", "quantize_weight_int8", "new_dropout_seed",
           "scaled_dot_product_attention"]

import math

from . import reference


def new_dropout_seed():
    """A fresh Philox seed for one op call: an int64 CPU tensor with one element, drawn from
    torch's default CPU generator, so calls are reproducible under ``torch.manual_seed`` (on every
    device: the CUDA kernels draw the same mask as the CPU ones for the same seed)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


def _dropout_args(op, name, p, training, seed):
    """(p, seed) an op gets: p is 0 outside training; a seed is drawn only when p > 0, so calls
    without dropout leave torch's RNG state untouched (the op then ignores the placeholder)."""
    p = float(p) if training else 0.0
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{op}: argument '{name}' must be a probability in [0, 1], got {p}")
    if p == 0.0:
        return p, _NO_SEED
    return p, new_dropout_seed() if seed is None else seed


# The placeholder seed of calls without dropout (the ops never read or write it): one tensor, not
# an allocation per call. Created at import, outside any inference_mode, so autograd may save it.
_NO_SEED = torch.zeros(1, dtype=torch.int64)


def _autocast(*tensors, dtype=None):
    """Inside ``torch.autocast`` for the tensors' device, the float32 tensors cast to ``dtype`` (the
    autocast dtype by default), as torch's autocast does for its own matmul-like ops; float64 and
    non-floating tensors pass unchanged. Outside autocast, all pass unchanged."""
    device = next(t for t in tensors if t is not None).device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = dtype or torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64
                 and t.dtype != dtype else t for t in tensors)


def dropout_mask(like, p, seed):
    """The keep-mask (bool, shaped like ``like``, on its device) that a dropout-capable aiayn op
    draws for probability ``p`` and ``seed``: element i of the row-major order is kept iff word
    (i % 4) of Philox4x32-10(counter = i // 4, key = seed) is >= p * 2^32. Kept elements are
    scaled by 1 / (1 - p)."""
    return torch.ops.aiayn.dropout_mask(like, float(p), seed)


def add_dropout_layer_norm(x, residual, weight=None, bias=None, p=0.0, eps=1e-5, training=True,
                           seed=None, return_dropout_mask=False):
    """``LayerNorm(residual + dropout(x))`` over the last dimension, in one fused kernel.

    The sub-layer connection of the Transformer (Vaswani et al., 2017, §3.1 and §5.4): ``x`` is the
    sub-layer's output, ``residual`` its input. Same result as
    ``F.layer_norm(residual + F.dropout(x, p, training), (D,), weight, bias, eps)``.

    Args:
        x, residual: ``(..., D)`` tensors of one dtype (float32, bfloat16, float64 on the CPU;
            float16 too on CUDA) and device. Any strides; the last dim should be contiguous to avoid
            a copy.
        weight, bias: ``(D,)`` in x's dtype or float32, or None (1 and 0).
        p: dropout probability on ``x`` (inverted dropout: kept values scaled by 1 / (1 - p)).
        eps: added to the variance.
        training: dropout only when True.
        seed: optional int64 tensor (one element) choosing the dropout mask; by default a fresh one
            is drawn from torch's default generator (``new_dropout_seed``).
        return_dropout_mask: also return the bool keep-mask used (``dropout_mask(x, p, seed)``),
            for exact tests.

    Statistics are computed in float32 (float64 for float64 inputs); the output has x's dtype.
    Inside ``torch.autocast`` lower-precision inputs are promoted to float32 (like ``F.layer_norm``
    there), so a bfloat16 sub-layer output can meet a float32 residual stream.
    The backward regenerates the dropout mask from the seed instead of storing it.
    """
    p, seed = _dropout_args("add_dropout_layer_norm", "p", p, training, seed)
    x, residual, weight, bias = _autocast(x, residual, weight, bias, dtype=torch.float32)
    out, _, _ = torch.ops.aiayn.add_dropout_layer_norm_fwd(x, residual, weight, bias, p, float(eps), seed)
    if return_dropout_mask:
        return out, dropout_mask(x, p, seed)
    return out


def _check_devices(op, x, **tensors):
    for name, t in tensors.items():
        if t is not None and torch.is_tensor(t) and t.device != x.device:
            raise ValueError(f"{op}: argument '{name}' is on {t.device} but 'x' is on {x.device}; "
                             "all tensors must be on one device")


def linear(x, w, b=None, activation=None):
    """``act(x @ w.T + b)``, ``act`` = identity (``activation=None``) or ``"relu"``: ``nn.Linear``
    (followed by a ReLU) on aiayn's own GEMM, bias and ReLU fused into its epilogue.

    Args:
        x: ``(..., in_features)``, float32, bfloat16 or float64 (float16 too on CUDA); any leading
            shape, any strides (a last dim that is not contiguous is copied).
        w: ``(out_features, in_features)`` like ``nn.Linear.weight``, x's dtype and device.
        b: ``(out_features,)`` or None.
        activation: None or ``"relu"``.

    Inside ``torch.autocast``, float32 arguments are cast to the autocast dtype (as for
    ``F.linear``; the same holds for ``feed_forward`` and ``scaled_dot_product_attention``).
    bfloat16 is multiplied with float32 accumulation (``vdpbf16ps`` on AVX-512 BF16) and rounded once
    at the end. Packed weights can be cached across calls (``aiayn.packed_weight_cache``, see
    ``feed_forward``). On CUDA: cuBLASLt with the bias and ReLU in its epilogue (TF32 for float32
    only where ``torch.backends.cuda.matmul.allow_tf32`` allows it); cuBLASLt's ReLU maps NaN to 0
    (the CPU and the CUDA fallback keep NaN).
    """
    if activation not in (None, "relu"):
        raise ValueError(f"linear: argument 'activation' must be None or 'relu', got {activation!r}")
    _check_devices("linear", x, w=w, b=b)
    x, w, b = _autocast(x, w, b)
    return torch.ops.aiayn.linear_fwd(x, w, b, activation == "relu")


def quantize_weight_int8(w):
    """``(w_q, w_scale)`` for :func:`linear_int8` from a float weight ``(out_features, in_features)``:
    symmetric per output channel, ``w_scale = max|w_row| / 127`` (float32; 1 for a zero row),
    ``w_q = round(w / w_scale)`` (int8 in [-127, 127]). Same as ``aiayn.reference.quantize_weight_int8``."""
    from . import reference
    if not torch.is_tensor(w) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError("quantize_weight_int8: argument 'w' must be a 2-d floating-point tensor, got "
                         f"{tuple(w.shape) if torch.is_tensor(w) else type(w).__name__}")
    return reference.quantize_weight_int8(w)


def linear_int8_pack(w):
    """The blocked layout of an int8 weight that :func:`linear_int8` reads (uint8, 1-d, the same on
    every ISA): pack once, pass as ``w_packed`` to every call."""
    return torch.ops.aiayn.linear_int8_pack(w)


def linear_int8(x, w, w_scale, b=None, activation=None, w_packed=None):
    """int8 inference linear (CPU only, no autograd): ``act(float(acc) * (x_scale * w_scale) + b)``,
    float32 ``(..., out_features)``.

    Each row of ``x`` is quantized on the fly, symmetric: ``x_scale = max|x_row| / 127``,
    ``q = round-half-even(x * (127 / max|x_row|))`` in [-127, 127] (a zero row: scale 0, output
    ``b``; a row with inf / NaN: NaN outputs); ``acc = q @ w^T`` is exact in int32. Then, in float32,
    ``float(acc) * (x_scale * w_scale)``, ``+ b``, ReLU: ``aiayn.reference.linear_int8`` gives the
    same bits. Kernels: AVX-512 VNNI (``vpdpbusd``), AVX2 (``vpmaddwd``) or scalar, by
    ``aiayn.cpu_isa`` like the other ops; all give the same result.

    Args:
        x: ``(..., in_features)`` float32 or bfloat16 (widened), any strides.
        w: int8 ``(out_features, in_features)``, e.g. from :func:`quantize_weight_int8`.
        w_scale: float32 ``(out_features,)``.
        b: float32 ``(out_features,)`` or None.
        activation: None or ``"relu"``.
        w_packed: ``linear_int8_pack(w)``, or None to pack ``w`` on every call.

    Error bound against the float product with the dequantized weight ``w * w_scale``: per element
    ``|out - x (w w_scale)^T| <= 0.5 x_scale sum_k |w_q[n, k]| w_scale[n]`` plus float32 rounding
    (each activation is off by at most half a quantization step).
    """
    if activation not in (None, "relu"):
        raise ValueError(f"linear_int8: argument 'activation' must be None or 'relu', got {activation!r}")
    for name, t in (("x", x), ("w", w), ("w_scale", w_scale), ("b", b), ("w_packed", w_packed)):
        if t is None and name in ("b", "w_packed"):
            continue
        if not torch.is_tensor(t):
            raise TypeError(f"linear_int8: argument '{name}' must be a tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"linear_int8: argument '{name}' is on {t.device}; int8 inference runs on the CPU only")
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("linear_int8: inference only, no gradient; call it under torch.no_grad() or "
                           "on a tensor that does not require grad")
    return torch.ops.aiayn.linear_int8(x, w, w_scale, b, activation == "relu", w_packed)


def feed_forward(x, w1, b1, w2, b2, dropout_p=0.0, training=True, seed=None, return_dropout_mask=False):
    """The position-wise feed-forward network of the Transformer (Vaswani et al., 2017, §3.3),
    ``FFN(x) = max(0, x W1 + b1) W2 + b2``, with dropout on the hidden activation (as in
    tensor2tensor and the annotated transformer):
    ``linear(dropout(relu(linear(x, w1, b1)), dropout_p), w2, b2)``. Same result as
    ``nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Dropout(p), nn.Linear(d_ff, d_model))``
    with that module's parameters passed as ``w1, b1, w2, b2``.

    Args:
        x: ``(..., d_model)``, float32, bfloat16 or float64 (float16 too on CUDA); any leading shape,
            any strides.
        w1: ``(d_ff, d_model)``, b1: ``(d_ff,)`` or None, w2: ``(d_model, d_ff)``, b2: ``(d_model,)`` or
            None, all in x's dtype and on its device (``nn.Linear`` layout).
        dropout_p: dropout probability on the hidden activation (inverted: kept values scaled by
            1 / (1 - p)); only when ``training``.
        seed: optional int64 tensor (one element) choosing the mask; by default a fresh one is drawn
            from torch's default generator, so ``torch.manual_seed`` makes calls reproducible.
        return_dropout_mask: also return the bool keep-mask of the hidden activation, shape
            ``(..., d_ff)``: ``dropout_mask(hidden, p, seed)`` -- hidden element (t, j) (t the
            flattened token index) is Philox element number ``t * d_ff + j``.

    Kernels: two GEMMs of aiayn's own (packed panels, register-blocked micro-kernels); bias, ReLU
    and dropout are applied in the first one's epilogue while the tile is in registers. The backward
    needs no stored mask: the saved hidden activation is > 0 exactly where the unit was active and
    kept. Bias gradients are summed while the weight-gradient GEMMs pack their operand. On CUDA the
    GEMMs run on cuBLASLt with fused epilogues: bias + ReLU writing a ReLU bit-mask in the first,
    into which one pass of ours folds the dropout mask (same Philox mask as the CPU for the same
    seed); the backward's first GEMM applies that mask and sums the bias gradient in its epilogue.
    torch's matmul plus passes of ours take over any GEMM cuBLASLt declines (all of them with
    ``AIAYN_CUBLASLT=0``). cuBLASLt's ReLU maps NaN to 0 (the CPU and that fallback keep NaN).

    Packed weights: each call packs ``w1`` and ``w2`` into the GEMM's panel layout (O(d_model *
    d_ff), small next to the GEMMs for many tokens). Inside ``aiayn.packed_weight_cache()`` (or with
    ``AIAYN_PACK_CACHE=1``) the packed copies are cached, keyed on the weight's storage, data pointer,
    shape, strides, dtype and version counter (``w._version``): any in-place update
    (``optimizer.step()``, ``w.add_()``, ``w.copy_()``) bumps the version and the next call repacks,
    so weights are packed once per optimizer step. Writes through ``w.data`` bypass the version
    counter and are not seen (hence opt-in); ``aiayn._C.clear_pack_cache()`` empties the cache.
    """
    p, seed = _dropout_args("feed_forward", "dropout_p", dropout_p, training, seed)
    _check_devices("feed_forward", x, w1=w1, b1=b1, w2=w2, b2=b2)
    x, w1, b1, w2, b2 = _autocast(x, w1, b1, w2, b2)
    out, hidden, _ = torch.ops.aiayn.feed_forward_fwd(x, w1, b1, w2, b2, p, seed)
    if return_dropout_mask:
        return out, dropout_mask(hidden, p, seed)
    return out


def scaled_dot_product_attention(q, k, v, attn_mask=None, key_padding_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, training=True, seed=None, return_dropout_mask=False):
    """``softmax(q kᵀ · scale + mask) v``, the paper's scaled dot-product attention (§3.2.1), in one
    fused kernel that never forms the Lq × Lk score matrix (flash-attention style).

    Same meaning as ``torch.nn.functional.scaled_dot_product_attention`` for the arguments they share:

    Args:
        q: ``(B, H, Lq, D)``; k, v: ``(B, H, Lk, D)``; one dtype (float32, bfloat16, float64; float16
            too on CUDA) and device. Any strides with a contiguous last dim are used without a copy, e.g.
            views of a fused ``(B, L, 3, H, D)`` QKV projection permuted to ``(B, H, L, D)``.
            ``D`` ≤ 256.
        attn_mask: broadcastable to ``(B, H, Lq, Lk)``. **bool: True = takes part** (torch's
            convention); floating: **added** to the scores (``-inf`` removes a key).
        key_padding_mask: ``(B, Lk)`` bool with ``nn.MultiheadAttention``'s convention:
            **True = padding, ignored** (the opposite sense of a bool ``attn_mask``).
        dropout_p: dropout on the attention probabilities (inverted: kept ones scaled by
            1 / (1 - p)), only when ``training``.
        is_causal: key j takes part in query i only if ``j <= i`` (torch's top-left alignment);
            combines with the masks above.
        scale: defaults to ``1 / sqrt(D)``.
        seed: optional int64 tensor (one element) choosing the dropout mask; by default drawn from
            torch's default generator (reproducible under ``torch.manual_seed``).
        return_dropout_mask: also return the bool keep-mask ``(B, H, Lq, Lk)`` the call used.

    Returns ``(B, H, Lq, D)``, contiguous, in q's dtype (float32 accumulation for bfloat16). A query
    row whose keys are all masked returns zeros (and zero gradients), not NaN. Training in bfloat16
    on the CPU, autograd saves the output in float32 (2 more bytes per element than torch's saved
    bfloat16 output): the backward's row terms ``dO · O`` then carry no bfloat16 rounding, which rows
    over a few keys would turn into gradient errors larger than torch's bfloat16 math makes.
    """
    p, seed = _dropout_args("scaled_dot_product_attention", "dropout_p", dropout_p, training, seed)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    q, k, v = _autocast(q, k, v)
    # Training in bfloat16 on the CPU: the kernel returns the float32 output, which autograd saves,
    # and the caller gets it rounded. The backward's row terms delta = dO . O then carry no rounding
    # of O, which rows over a few keys (P near 1) would turn into dQ / dK errors beyond torch's.
    float_out = (q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled()
                 and (q.requires_grad or k.requires_grad or v.requires_grad))
    out, _ = torch.ops.aiayn.attention_fwd(q, k, v, attn_mask, key_padding_mask, p, bool(is_causal), float(scale), seed,
                                           float_out)
    if float_out:
        out = out.to(q.dtype)
    if return_dropout_mask:
        B, H, Lq, _ = q.shape
        return out, dropout_mask(q.new_empty((B, H, Lq, k.shape[-2]), dtype=torch.bool), p, seed)
    return out


_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def linear_cross_entropy(x, weight, target, label_smoothing=0.0, ignore_index=-100, reduction="mean",
                         return_nll=False):
    """The pre-softmax projection (§3.4) fused with the label-smoothed cross-entropy (§5.4):
    ``F.cross_entropy(x @ weight.T, target, label_smoothing=..., ignore_index=..., reduction=...)``
    without ever forming the tokens x vocabulary logits or log-probabilities, in the forward or
    the backward.

    Args:
        x: ``(..., d)``, float32, bfloat16 or float64; any leading shape, any strides.
        weight: ``(V, d)`` (``nn.Linear.weight``, or the shared embedding matrix), x's dtype and device.
        target: ``(...)`` = x's leading shape, int64 classes in ``[0, V)`` or ``ignore_index``
            (anything else raises ValueError).
        label_smoothing: eps in ``[0, 1]``, torch's convention: the loss of a row is
            ``(1 - eps) * nll + eps * mean_j(-log p_j)`` over all V classes (the target included).
        ignore_index: rows with this target contribute 0 to the loss and to every gradient.
        reduction: ``"mean"`` (over the rows not ignored; NaN when every row is, as torch),
            ``"sum"`` or ``"none"`` (shaped like ``target``, 0 at ignored rows).
        return_nll: also return the unsmoothed negative log-likelihood with the same reduction,
            from the same pass (``(loss, nll)``): what a training loop reports next to the loss.

    Results are float32 (float64 for float64 inputs; bfloat16 inputs give float32 losses: the
    logits are accumulated and the softmax computed in float32, never rounded to bfloat16).
    Gradients come in the inputs' dtypes. Inside ``torch.autocast``, float32 ``x`` and ``weight``
    are cast to the autocast dtype first, as ``F.linear`` would be for the projection (so the
    decoder's float32 states meet a bfloat16 copy of a float32 weight).

    How: the rows are processed in chunks (up to ~64 MiB of logits each, whatever the number of
    tokens; torch's unfused path holds tokens x V logits, log-probabilities and their gradient):
    logits on aiayn's GEMM, log-softmax, loss terms and, when autograd will need them (a scalar
    reduction with ``x`` or ``weight`` requiring grad), the logits' gradient in the same buffer,
    consumed at once by ``dx = G W`` and ``dW += G^T x``. At the base model's 4096 x 512 x 37000,
    forward + backward grew the peak RSS by 359 MiB (torch's unfused: 1680 MiB). Backward then only scales the finished gradients; with
    ``reduction="none"``, or when the returned nll is differentiated too, it recomputes the chunks
    from the saved log-sum-exps (one more GEMM). On CUDA: a chunked pure-PyTorch version of the
    same steps (not yet run on a GPU).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: argument 'reduction' must be 'none', 'mean' or 'sum', "
                         f"got {reduction!r}")
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: argument 'label_smoothing' must be in [0, 1], got {label_smoothing}")
    for name, t in (("x", x), ("weight", weight), ("target", target)):
        if not torch.is_tensor(t):
            raise TypeError(f"linear_cross_entropy: argument '{name}' must be a tensor, got {type(t).__name__}")
    _check_devices("linear_cross_entropy", x, weight=weight, target=target)
    x, weight = _autocast(x, weight)
    mode = _REDUCTIONS[reduction]
    compute_grad = mode != 0 and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    loss, nll, _, _, _ = torch.ops.aiayn.linear_cross_entropy_fwd(x, weight, target, label_smoothing,
                                                                  int(ignore_index), mode, compute_grad)
    return (loss, nll) if return_nll else loss


def log_softmax_topk(logits, k, exclude=()):
    """Beam search's scoring of one step: the ``k`` largest entries of
    ``log_softmax(logits.float(), -1)`` along the last dim, descending, and their indices, never
    choosing a column in ``exclude`` (padding, BOS: they still count in the normaliser), as
    ``(values float32, indices int64)`` shaped ``(..., k)``. Equal values come lower index first;
    where a row has fewer than ``k`` finite, non-excluded values the remaining slots hold -inf and
    index -1.

    On the CPU for float32 and bfloat16 logits one pass per row (max, then the sum of exponentials
    with the top-k selection beside it) replaces ``log_softmax`` writing the rows x vocabulary
    log-probabilities and ``topk`` reading them back; the values agree with torch's
    ``log_softmax`` to float32 rounding (tests). Elsewhere (other dtypes, CUDA): the reference,
    ``aiayn.reference.log_softmax_topk``. Inference only (no autograd). ``k`` at most 64.
    """
    if not torch.is_tensor(logits):
        raise TypeError(f"log_softmax_topk: argument 'logits' must be a tensor, got {type(logits).__name__}")
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"log_softmax_topk: argument 'k' must be an int, got {type(k).__name__}")
    exclude = [int(e) for e in exclude]
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16):
        return torch.ops.aiayn.log_softmax_topk(logits, k, exclude)
    if logits.dim() < 1 or logits.shape[-1] == 0 or not 1 <= k <= min(logits.shape[-1], 64):
        raise ValueError(f"log_softmax_topk: argument 'k' must be in [1, min(V, 64)] for logits of shape "
                         f"{tuple(logits.shape)}, got {k}")
    return reference.log_softmax_topk(logits, k, exclude)
