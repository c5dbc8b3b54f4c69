"""Reduced-precision inference copies of a trained model: ``aiayn.quantize(model, "bf16")`` (this
module is aiayn.quantization; the function is also reachable as aiayn.quantize).

"bf16": every parameter and buffer in bfloat16, so the GEMMs, attention and the key/value caches
of :meth:`Transformer.generate` run in bf16 (the AVX-512-BF16 / AMX kernels on CPUs that have
them); the kernels keep their softmax, log-sum-exp and LayerNorm statistics in float32, and beam
search scores the vocabulary in float32 (``log_softmax`` of the upcast logits). Training stays in
float32 with autocast (``aiayn train --bf16``): this is for translating.

int8 (weights per output channel, activations per row, int32 accumulation) is not implemented
yet; asking for it is an error that says so.
"""

import copy

import torch

__all__ = ["quantize", "MODES", "quantization_of"]

MODES = ("bf16",)
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
    if mode == "int8":
        raise NotImplementedError("quantize: int8 inference is not implemented yet; 'bf16' is available")
    if mode not in MODES:
        raise ValueError(f"quantize: 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    done = quantization_of(model)
    if done is not None:
        raise ValueError(f"quantize: the model is already quantized ({done}); quantize the float32 model instead")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"quantize: expects a float32 model, got parameters in {sorted(map(str, dtypes))}")
    target = model if inplace else copy.deepcopy(model)
    target.to(torch.bfloat16).eval()
    setattr(target, _ATTRIBUTE, mode)
    return target
