"""Import ``torch.nn.Transformer`` and ``torch.nn.MultiheadAttention`` into aiayn modules.

The imported modules keep the forward signature and conventions of the torch module they came
from (sequence-first unless ``batch_first``; bool ``attn_mask`` True = *not* allowed, float masks
added; key padding True = ignored) and compute the same outputs on aiayn's kernels.
"""

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import Decoder, Encoder, MultiHeadAttention

__all__ = ["from_torch_transformer", "from_torch_mha", "TorchTransformer", "TorchMultiheadAttention"]


def _attention_masks(attn_mask, key_padding_mask, batch, heads, op):
    """torch's (attn_mask, key_padding_mask) -> aiayn's: bool attn_mask flips sense (torch: True =
    masked out; aiayn: True = takes part), (N*h, L, S) masks become (N, h, L, S), a float key
    padding mask becomes an additive attention mask."""
    if attn_mask is not None:
        if attn_mask.dim() == 3:
            if attn_mask.shape[0] != batch * heads:
                raise ValueError(f"{op}: a 3-D attn_mask must be (N * num_heads, L, S) = ({batch * heads}, L, S), "
                                 f"got {tuple(attn_mask.shape)}")
            attn_mask = attn_mask.view(batch, heads, *attn_mask.shape[1:])
        elif attn_mask.dim() != 2:
            raise ValueError(f"{op}: attn_mask must be 2-D (L, S) or 3-D (N * num_heads, L, S), got "
                             f"{attn_mask.dim()}-D")
        if attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        additive = key_padding_mask[:, None, None, :]
        if attn_mask is None:
            attn_mask = additive
        elif attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=additive.dtype, device=additive.device).masked_fill(
                ~attn_mask, float("-inf")) + additive
        else:
            attn_mask = attn_mask + additive
        key_padding_mask = None
    return attn_mask, key_padding_mask


class TorchMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s interface on :class:`aiayn.nn.MultiHeadAttention` (``self.attn``)."""

    def __init__(self, attn: MultiHeadAttention, batch_first=False):
        super().__init__()
        self.attn, self.batch_first = attn, batch_first

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        same = key is query and value is query
        attn_mask, key_padding_mask = _attention_masks(attn_mask, key_padding_mask, query.shape[0],
                                                       self.attn.num_heads, "TorchMultiheadAttention")
        if is_causal and attn_mask is not None:
            is_causal = False  # torch: is_causal is a hint that attn_mask is the causal mask
        out = self.attn(query, None if same else key, None if same else value, key_padding_mask=key_padding_mask,
                        attn_mask=attn_mask, is_causal=is_causal, need_weights=need_weights)
        weights = None
        if need_weights:
            out, weights = out
            if average_attn_weights:
                weights = weights.mean(1)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def from_torch_mha(mha: nn.MultiheadAttention) -> TorchMultiheadAttention:
    """An aiayn copy of ``mha`` (same weights, same forward arguments and outputs)."""
    if not isinstance(mha, nn.MultiheadAttention):
        raise TypeError(f"from_torch_mha: expected nn.MultiheadAttention, got {type(mha).__name__}")
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("from_torch_mha: only kdim == vdim == embed_dim without add_bias_kv / add_zero_attn "
                         "is supported (the paper's multi-head attention)")
    p = mha.in_proj_weight
    ours = MultiHeadAttention(mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None,
                              device=p.device, dtype=p.dtype)
    ours.load_state_dict({k: v for k, v in mha.state_dict().items()}, strict=True)
    return TorchMultiheadAttention(ours, mha.batch_first).train(mha.training)


class TorchTransformer(nn.Module):
    """``nn.Transformer``'s interface (embedded inputs in, decoder output out) on aiayn's
    :class:`~aiayn.nn.Encoder` and :class:`~aiayn.nn.Decoder`, with nn.Transformer's final LayerNorms
    (``final_norm=True``)."""

    def __init__(self, encoder: Encoder, decoder: Decoder, num_heads, batch_first=False):
        super().__init__()
        self.encoder, self.decoder, self.num_heads, self.batch_first = encoder, decoder, num_heads, batch_first

    def forward(self, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
                tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=None, tgt_is_causal=None,
                memory_is_causal=False):
        if not self.batch_first:
            src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
        if src.shape[0] != tgt.shape[0]:
            raise ValueError(f"TorchTransformer: src and tgt batch sizes differ ({src.shape[0]} vs {tgt.shape[0]})")
        n, h = src.shape[0], self.num_heads
        src_mask, src_kpm = _attention_masks(src_mask, src_key_padding_mask, n, h, "TorchTransformer")
        tgt_mask, tgt_kpm = _attention_masks(tgt_mask, tgt_key_padding_mask, n, h, "TorchTransformer")
        memory_mask, memory_kpm = _attention_masks(memory_mask, memory_key_padding_mask, n, h, "TorchTransformer")
        memory = self.encoder(src, src_kpm, src_mask)
        if memory_is_causal and memory_mask is None:
            memory_mask = torch.ones(tgt.shape[1], src.shape[1], dtype=torch.bool, device=src.device).tril()
        out = self.decoder(tgt, memory, tgt_kpm, memory_kpm, tgt_mask, memory_mask,
                           is_causal=bool(tgt_is_causal) and tgt_mask is None)
        return out if self.batch_first else out.transpose(0, 1)


# nn.Transformer's parameter names -> aiayn's.
_RENAMES = [
    (r"\.multihead_attn\.", ".cross_attn."),
    (r"\.linear1\.", ".feed_forward.w_1."),
    (r"\.linear2\.", ".feed_forward.w_2."),
    (r"\.norm([123])\.", lambda m: f".sublayer.{int(m.group(1)) - 1}.norm."),
]


def _check_layer(layer, op):
    act = getattr(layer, "activation", None)
    if act is not F.relu and not isinstance(act, nn.ReLU):
        raise ValueError(f"{op}: only activation='relu' is supported (the paper's FFN), got {act}")


def from_torch_transformer(model: nn.Transformer) -> TorchTransformer:
    """An aiayn copy of ``model`` (same weights; ``forward`` takes nn.Transformer's arguments and
    honours its ``batch_first`` and ``norm_first``). Dropout rates are copied: nn.Transformer's
    ``dropout`` acts on attention probabilities, the FFN's hidden activation and the residual
    branches alike."""
    if not isinstance(model, nn.Transformer):
        raise TypeError(f"from_torch_transformer: expected nn.Transformer, got {type(model).__name__}")
    enc_layers, dec_layers = model.encoder.layers, model.decoder.layers
    first = enc_layers[0]
    for layer in list(enc_layers) + list(dec_layers):
        _check_layer(layer, "from_torch_transformer")
    p = first.linear1.weight
    common = dict(d_model=model.d_model, num_heads=model.nhead, d_ff=first.linear1.out_features,
                  dropout=first.dropout1.p, attention_dropout=first.self_attn.dropout, ffn_dropout=first.dropout.p,
                  norm_first=first.norm_first, eps=first.norm1.eps, device=p.device, dtype=p.dtype)
    encoder = Encoder(len(enc_layers), final_norm=model.encoder.norm is not None, **common)
    decoder = Decoder(len(dec_layers), final_norm=model.decoder.norm is not None, **common)
    ours = TorchTransformer(encoder, decoder, model.nhead, model.batch_first)
    state = {}
    for name, value in model.state_dict().items():
        for pattern, repl in _RENAMES:
            name = re.sub(pattern, repl, name)
        state[name] = value
    ours.load_state_dict(state, strict=True)
    return ours.train(model.training)
