"""Incremental decoding's step through all decoder layers (§3.1, §3.2.3) in one call of aiayn's C++
helper ``aiayn._C.decoder_step`` instead of ~20 Python-level op calls per layer.

The helper calls the same ops in the same order with the same arguments as the modules do (the
layers' forward with a :class:`KVCache`), so the outputs are the same bits (tested); what it saves is
the Python interpreter between the ops: at the Multi30k model's beam search (3 layers, 128
hypotheses) about a fifth of a decoding step was that (see docs/architecture.md). It applies where
that equivalence is plain: CPU tensors under ``torch.inference_mode`` (how aiayn's searches decode),
no autocast, compiled ops, one new token per row, caches already holding a step (the first step,
which projects the encoder output's keys/values into the cross-attention caches, runs in Python),
no target masks. Module hooks are not called on this path. ``enabled(False)`` turns it off (the
tests compare both paths).
"""

import contextlib

import torch

from ..functional import _NO_SEED
from . import backend

__all__ = ["enabled"]

_enabled = True


@contextlib.contextmanager
def enabled(on=True):
    """Use (or, with ``on=False``, never use) the C++ step inside this block."""
    global _enabled
    before, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = before


def applies(decoder, x, cache, tgt_key_padding_mask, tgt_mask, memory_mask, is_causal):
    """Whether ``Decoder.forward`` may run this call on the C++ step (see the module docstring)."""
    return (_enabled and cache is not None and x.dim() == 3 and x.shape[1] == 1 and is_causal
            and tgt_key_padding_mask is None and tgt_mask is None and memory_mask is None
            and not decoder.training and x.device.type == "cpu" and torch.is_inference_mode_enabled()
            and not torch.is_autocast_enabled("cpu") and backend.uses_compiled_ops(x.device)
            and len(cache) == len(decoder.layers)
            and all(c["cross"].static and c["self"].k is not None for c in cache))


def _linear_slot(weight, bias):
    return [weight, None, bias, None]


def layer_params(layer):
    """The C++ step's tensors of one DecoderLayer (csrc/cpu/decoder_step.h): six linear slots
    (weight, scale, bias, packed), then the three LayerNorms' (weight, bias)."""
    sa, ca, ff = layer.self_attn, layer.cross_attn, layer.feed_forward
    d = sa.d_model
    if sa.int8:  # Int8Linear.rows: the same row slices, scales and packed weights the modules use
        slots = [list(sa.in_proj.rows(0, 3 * d)), list(sa.out_proj.rows(0, d)),
                 list(ca.in_proj.rows(0, d)), list(ca.out_proj.rows(0, d))]
    else:
        ca_b = None if ca.in_proj_bias is None else ca.in_proj_bias[:d]
        slots = [_linear_slot(sa.in_proj_weight, sa.in_proj_bias), _linear_slot(sa.out_proj.weight, sa.out_proj.bias),
                 _linear_slot(ca.in_proj_weight[:d], ca_b), _linear_slot(ca.out_proj.weight, ca.out_proj.bias)]
    if ff.int8:
        slots += [list(ff.w_1.rows(0, ff.w_1.out_features)), list(ff.w_2.rows(0, ff.w_2.out_features))]
    else:
        slots += [_linear_slot(ff.w_1.weight, ff.w_1.bias), _linear_slot(ff.w_2.weight, ff.w_2.bias)]
    params = [t for slot in slots for t in slot]
    for sub in layer.sublayer:
        params += [sub.norm.weight, sub.norm.bias]
    return params


def run(decoder, x, memory_key_padding_mask, cache):
    """The layers' output ``(N, 1, d_model)`` for this step's embedded tokens ``x``; appends the
    step's keys/values to the self-attention caches."""
    import aiayn._C as _C

    params = getattr(cache, "step_params", None)
    if params is None:
        params = [t for layer in decoder.layers for t in layer_params(layer)]
        if hasattr(cache, "step_params"):  # Decoder.new_cache's list: built once per search
            cache.step_params = params
    selfs = [c["self"] for c in cache]
    length = selfs[0].length
    for c in selfs:
        c.reserve(1)
    first = decoder.layers[0]
    out = _C.decoder_step(x, params, [c.k for c in selfs], [c.v for c in selfs], length,
                          [c["cross"].k for c in cache], [c["cross"].v for c in cache], memory_key_padding_mask,
                          first.self_attn.num_heads, first.sublayer[0].norm.eps, first.sublayer[0].norm_first,
                          _NO_SEED)
    for c in selfs:
        c.length += 1
    return out
