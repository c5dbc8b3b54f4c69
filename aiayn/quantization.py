"""Reduced-precision inference copies of a trained model: ``aiayn.quantize(model, mode)`` (this
module is aiayn.quantization; the function is also reachable as aiayn.quantize). Training stays in
float32 (with autocast for ``aiayn train --bf16``): these are for translating.

"bf16": every parameter and buffer in bfloat16, so the GEMMs, attention and the key/value caches
of :meth:`Transformer.generate` run in bf16 (the AVX-512-BF16 / AMX kernels on CPUs that have
them); the kernels keep their softmax, log-sum-exp and LayerNorm statistics in float32, and beam
search scores the vocabulary in float32 (``log_softmax`` of the upcast logits).

"int8" (CPU only): every linear layer -- the attention's Q/K/V and output projections, both FFN
layers and the vocabulary projection -- gets int8 weights, symmetric per output channel
(:class:`aiayn.nn.int8.Int8Linear`), and runs :func:`aiayn.functional.linear_int8`: activations
are quantized per row on the fly, products accumulate exactly in int32 (AVX-512 VNNI, AVX2 or
scalar kernels), and the epilogue dequantizes and adds the float32 bias (the FFN's ReLU too).
Attention, LayerNorm, the embeddings and the residual stream stay float32; the projection gets a
quantized copy of a shared embedding matrix while the lookups keep its float32 rows. Weights are
where int8 saves memory (4x on the linears) and time (the decoder's small-batch GEMMs read them
from memory at every step). The float parameters left are frozen (``requires_grad=False``).

"int8_bf16" (CPU only): "int8"'s linear layers, with attention in bfloat16: the Q/K/V projections'
outputs are rounded to bf16, so the key/value caches hold half the bytes (each step's appends, beam
search's reorders and attention's reads of them) and attention runs its bf16 kernels (float32
softmax statistics); its output is widened again by the int8 output projection. On the Multi30k
recipe model (Zen 4, beam 4) 1.14x "int8"'s sentences/s at the same BLEU (38.48 against 38.54;
float32 38.39). It needs no bf16 hardware but gains most where the CPU has AVX-512-BF16 or AMX.

Every mode returns a copy in eval mode (``inplace=True`` converts the model itself), marks it
(:func:`quantization_of`), refuses an already quantized model, and saves / loads as such through
:meth:`Transformer.save` / :meth:`Transformer.load` (``aiayn translate --checkpoint`` takes the file).
"""

import copy

import torch

__all__ = ["quantize", "MODES", "quantization_of"]

MODES = ("bf16", "int8", "int8_bf16")
# The int8 modes (CPU only) and the dtype each runs attention and its caches in (None: float32).
INT8_MODES = {"int8": None, "int8_bf16": torch.bfloat16}
_ATTRIBUTE = "_aiayn_quantization"


def quantization_of(model):
    """The mode a model was quantized with, or None for a float32 model."""
    return getattr(model, _ATTRIBUTE, None)


def quantize(model, mode, *, inplace=False):
    """A copy of ``model`` (an :class:`aiayn.nn.Transformer`) for inference in ``mode``, in eval
    mode; ``inplace=True`` converts ``model`` itself. The source model is never changed otherwise."""
    from aiayn.nn import Transformer

    if not isinstance(model, Transformer):
        raise TypeError(f"quantize: 'model' must be an aiayn.nn.Transformer, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"quantize: 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    done = quantization_of(model)
    if done is not None:
        raise ValueError(f"quantize: the model is already quantized ({done}); quantize the float32 model instead")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"quantize: expects a float32 model, got parameters in {sorted(map(str, dtypes))}")
    if mode in INT8_MODES:
        devices = {p.device.type for p in model.parameters()}
        if devices != {"cpu"}:
            raise ValueError(f"quantize: int8 inference runs on the CPU only; the model is on "
                             f"{', '.join(sorted(devices))} (call model.cpu() first, or use 'bf16' on a GPU)")
    target = model if inplace else copy.deepcopy(model)
    if mode == "bf16":
        target.to(torch.bfloat16)
    else:
        with torch.no_grad():
            to_int8(target, mode=mode)
    target.eval()
    setattr(target, _ATTRIBUTE, mode)
    return target


def to_int8(model, quantize_weights=True, mode="int8"):
    """Replace ``model``'s linear layers by :class:`Int8Linear` in place. ``quantize_weights=False``
    gives the int8 layers of the right shapes with placeholder values (what ``Transformer.load``
    fills from a file). ``mode``: one of :data:`INT8_MODES`, which sets the dtype attention and its
    caches run in ("int8_bf16": bf16)."""
    from aiayn.nn.attention import MultiHeadAttention
    from aiayn.nn.feed_forward import PositionwiseFeedForward
    from aiayn.nn.int8 import Int8Linear

    def convert(weight, bias):
        if quantize_weights:
            return Int8Linear.from_float(weight, bias)
        return Int8Linear(weight.shape[1], weight.shape[0], bias is not None)

    for module in list(model.modules()):
        if isinstance(module, MultiHeadAttention):
            in_proj = convert(module.in_proj_weight, module.in_proj_bias)
            del module.in_proj_weight, module.in_proj_bias
            module.in_proj = in_proj
            module.out_proj = convert(module.out_proj.weight, module.out_proj.bias)
            module.int8 = True
            if INT8_MODES[mode] is not None:
                module.int8_attention_dtype = INT8_MODES[mode]
        elif isinstance(module, PositionwiseFeedForward):
            module.w_1 = convert(module.w_1.weight, module.w_1.bias)
            module.w_2 = convert(module.w_2.weight, module.w_2.bias)
            module.int8 = True
    model.generator = convert(model.projection_weight, None)
    model.int8 = True
    model.requires_grad_(False)
    return model
