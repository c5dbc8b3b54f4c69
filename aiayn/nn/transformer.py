"""The encoder-decoder Transformer (Vaswani et al., 2017, §3.1, Figure 1) on aiayn's ops."""

import json
import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backend, decoder_step
from .attention import KVCache, MultiHeadAttention
from .config import TransformerConfig
from .embedding import Embeddings, PositionalEncoding
from .feed_forward import PositionwiseFeedForward
from .sublayer import SublayerConnection

__all__ = ["EncoderLayer", "DecoderLayer", "Encoder", "Decoder", "Transformer"]


class EncoderLayer(nn.Module):
    """Self-attention, then the feed-forward network, each inside a :class:`SublayerConnection`
    (§3.1)."""

    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, attention_dropout=0.0, ffn_dropout=0.0,
                 norm_first=False, eps=1e-5, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.self_attn = MultiHeadAttention(d_model, num_heads, attention_dropout, **factory)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff, ffn_dropout, **factory)
        self.sublayer = nn.ModuleList(SublayerConnection(d_model, dropout, norm_first, eps, **factory)
                                      for _ in range(2))

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        x = self.sublayer[0](x, lambda y: self.self_attn(y, key_padding_mask=key_padding_mask, attn_mask=attn_mask))
        return self.sublayer[1](x, self.feed_forward)


class DecoderLayer(nn.Module):
    """Masked self-attention, attention over the encoder output, then the feed-forward network,
    each inside a :class:`SublayerConnection` (§3.1). Self-attention is causal (§3.2.3)."""

    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, attention_dropout=0.0, ffn_dropout=0.0,
                 norm_first=False, eps=1e-5, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.self_attn = MultiHeadAttention(d_model, num_heads, attention_dropout, **factory)
        self.cross_attn = MultiHeadAttention(d_model, num_heads, attention_dropout, **factory)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff, ffn_dropout, **factory)
        self.sublayer = nn.ModuleList(SublayerConnection(d_model, dropout, norm_first, eps, **factory)
                                      for _ in range(3))

    def forward(self, x, memory, tgt_key_padding_mask=None, memory_key_padding_mask=None, tgt_mask=None,
                memory_mask=None, is_causal=True, cache=None):
        """``cache``: ``{"self": KVCache, "cross": KVCache}`` for incremental decoding, or None."""
        self_cache = cache["self"] if cache is not None else None
        cross_cache = cache["cross"] if cache is not None else None
        x = self.sublayer[0](x, lambda y: self.self_attn(y, key_padding_mask=tgt_key_padding_mask, attn_mask=tgt_mask,
                                                         is_causal=is_causal, cache=self_cache))
        x = self.sublayer[1](x, lambda y: self.cross_attn(y, memory, key_padding_mask=memory_key_padding_mask,
                                                          attn_mask=memory_mask, cache=cross_cache))
        return self.sublayer[2](x, self.feed_forward)


class _Stack(nn.Module):
    """N identical layers (§3.1) and, with ``final_norm``, a LayerNorm after them: needed with
    pre-LN (``norm_first``, the default then), absent from the paper's post-LN model."""

    layer_type = None

    def __init__(self, num_layers, d_model, num_heads, d_ff, dropout=0.1, attention_dropout=0.0, ffn_dropout=0.0,
                 norm_first=False, eps=1e-5, final_norm=None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.layers = nn.ModuleList(self.layer_type(d_model, num_heads, d_ff, dropout, attention_dropout, ffn_dropout,
                                                    norm_first, eps, **factory) for _ in range(num_layers))
        final_norm = norm_first if final_norm is None else final_norm
        self.norm = nn.LayerNorm(d_model, eps=eps, **factory) if final_norm else None


class Encoder(_Stack):
    """A stack of N :class:`EncoderLayer` (§3.1)."""

    layer_type = EncoderLayer

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        for layer in self.layers:
            x = layer(x, key_padding_mask, attn_mask)
        return self.norm(x) if self.norm is not None else x


class Decoder(_Stack):
    """A stack of N :class:`DecoderLayer` (§3.1)."""

    layer_type = DecoderLayer

    def forward(self, x, memory, tgt_key_padding_mask=None, memory_key_padding_mask=None, tgt_mask=None,
                memory_mask=None, is_causal=True, cache=None):
        if decoder_step.applies(self, x, cache, tgt_key_padding_mask, tgt_mask, memory_mask, is_causal):
            # incremental decoding: all layers in one C++ call, same ops and results (decoder_step.py)
            x = decoder_step.run(self, x, memory_key_padding_mask, cache)
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, memory, tgt_key_padding_mask, memory_key_padding_mask, tgt_mask, memory_mask, is_causal,
                          None if cache is None else cache[i])
        return self.norm(x) if self.norm is not None else x

    def new_cache(self):
        """An empty per-layer key/value cache for :meth:`forward`'s ``cache``."""
        return _DecoderCache({"self": KVCache(), "cross": KVCache()} for _ in self.layers)


class _DecoderCache(list):
    """Decoder.new_cache's per-layer caches; also keeps the C++ step's parameter list of the search."""
    step_params = None


class Transformer(nn.Module):
    """The Transformer of "Attention Is All You Need" (Vaswani et al., 2017, Figure 1): embeddings
    (§3.4) plus sinusoidal positions (§3.5), an encoder and a decoder of N layers (§3.1), and a
    linear projection to the target vocabulary whose softmax gives the next-token distribution.

    With ``share_embeddings`` (the paper's setting, §3.4) one matrix is the source embedding, the
    target embedding and the pre-softmax projection. Dropout (P_drop) sits on every sub-layer output
    and on the embedding + positional-encoding sums (§5.4). Ops run on aiayn's kernels for the
    parameters' device (:mod:`aiayn.nn.backend`).

    ``forward(src, tgt_in)`` takes token ids ``(B, S)`` and ``(B, T)`` (``tgt_in`` starts with
    ``bos_id``) and returns logits ``(B, T, tgt_vocab_size)``. Padding masks are bool, True =
    padding; when not given they are ``tokens == pad_id``.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"Transformer: expected a TransformerConfig, got {type(config).__name__} "
                            "(use Transformer.from_config('base', vocab_size) for a preset)")
        c = self.config = config
        self.src_embed = Embeddings(c.src_vocab_size, c.d_model)
        self.tgt_embed = self.src_embed if c.share_embeddings else Embeddings(c.tgt_vocab_size, c.d_model)
        self.positional_encoding = PositionalEncoding(c.d_model, c.max_len)
        stack = dict(num_layers=c.num_layers, d_model=c.d_model, num_heads=c.num_heads, d_ff=c.d_ff, dropout=c.dropout,
                     attention_dropout=c.attention_dropout, ffn_dropout=c.ffn_dropout, norm_first=c.norm_first,
                     eps=c.layer_norm_eps)
        self.encoder = Encoder(**stack)
        self.decoder = Decoder(**stack)
        # The pre-softmax projection: the shared embedding matrix, or one of its own (no bias either way).
        self.generator = None if c.share_embeddings else nn.Linear(c.d_model, c.tgt_vocab_size, bias=False)

    @classmethod
    def from_config(cls, preset, src_vocab_size, tgt_vocab_size=None, **overrides):
        """``Transformer(TransformerConfig.preset(preset, src_vocab_size, tgt_vocab_size, **overrides))``."""
        return cls(TransformerConfig.preset(preset, src_vocab_size, tgt_vocab_size, **overrides))

    # --- the pieces of forward, used on their own by decoding ---------------------------------------

    def _padding_mask(self, tokens, mask):
        if mask is None and self.config.pad_id is not None:
            mask = tokens == self.config.pad_id
        return mask

    def _embed(self, embed, tokens, start=0, embedded=None):
        x = embed(tokens) if embedded is None else embedded
        x = x + self.positional_encoding(tokens.shape[1], start, x.dtype)
        return F.dropout(x, self.config.dropout, self.training)

    def encode(self, src, src_key_padding_mask=None, _embedded=None):
        """The encoder output ``(B, S, d_model)`` for source ids ``(B, S)``."""
        src_key_padding_mask = self._padding_mask(src, src_key_padding_mask)
        return self.encoder(self._embed(self.src_embed, src, embedded=_embedded), src_key_padding_mask)

    @property
    def projection_weight(self):
        """The pre-softmax projection's ``(tgt_vocab_size, d_model)`` matrix: the shared embedding
        matrix (§3.4; used unscaled here, the sqrt(d_model) factor belongs to the lookup), or the
        generator's own. ``project(x) = x @ projection_weight.T``; losses fused with the projection
        (``aiayn.train.loss.fused_label_smoothed_cross_entropy``) take it with the decoder states."""
        if self.int8:
            raise RuntimeError("Transformer.projection_weight: an int8 model projects with `generator` (int8 "
                               "weight and scales, inference only); use the float32 model for training losses")
        return self.tgt_embed.weight if self.generator is None else self.generator.weight

    # Set on the instance by aiayn.quantize(model, "int8"): the projection is then ``generator``, an
    # Int8Linear of the projection matrix (a quantized copy where it is the shared embedding, whose
    # float32 rows the lookups keep using).
    int8 = False

    def project(self, x):
        """Logits over the target vocabulary for decoder states ``(..., d_model)``."""
        if self.int8:
            return self.generator(x)
        return backend.linear(x, self.projection_weight)

    def decode(self, tgt_in, memory, src_key_padding_mask=None, tgt_key_padding_mask=None, cache=None, start=0,
               _embedded=None, return_hidden=False):
        """Logits ``(B, T, tgt_vocab_size)`` for target ids ``tgt_in`` given the encoder output.
        ``src_key_padding_mask`` must be given explicitly when the source had padding (the source ids
        are not seen here). With ``cache`` (from ``self.decoder.new_cache()``), ``tgt_in`` holds the
        tokens at positions ``start ..`` only and earlier keys/values come from the cache.
        ``return_hidden``: the decoder's final states ``(B, T, d_model)`` instead (no projection)."""
        if cache is None:
            tgt_key_padding_mask = self._padding_mask(tgt_in, tgt_key_padding_mask)
        x = self._embed(self.tgt_embed, tgt_in, start, _embedded)
        x = self.decoder(x, memory, tgt_key_padding_mask, src_key_padding_mask, is_causal=True, cache=cache)
        return x if return_hidden else self.project(x)

    def forward(self, src, tgt_in, src_key_padding_mask=None, tgt_key_padding_mask=None, return_hidden=False):
        """Logits ``(B, T, tgt_vocab_size)``; with ``return_hidden`` the decoder's final states
        ``(B, T, d_model)`` before the projection, for a loss fused with it (the training loop
        calls it so through DDP's forward; ``projection_weight`` is the matrix to apply)."""
        src_key_padding_mask = self._padding_mask(src, src_key_padding_mask)
        src_emb = tgt_emb = None
        if self.src_embed is self.tgt_embed and torch.is_grad_enabled() and self.src_embed.weight.requires_grad:
            # Shared matrix (§3.4): one lookup for source and target tokens, so its backward fills
            # one dense vocab x d_model gradient instead of two that autograd then adds.
            both = self.src_embed(torch.cat([src.reshape(-1), tgt_in.reshape(-1)]))
            src_emb = both[:src.numel()].view(*src.shape, -1)
            tgt_emb = both[src.numel():].view(*tgt_in.shape, -1)
        memory = self.encode(src, src_key_padding_mask, _embedded=src_emb)
        return self.decode(tgt_in, memory, src_key_padding_mask, tgt_key_padding_mask, _embedded=tgt_emb,
                           return_hidden=return_hidden)

    # --- decoding ----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, src, src_key_padding_mask=None, beam_size=4, length_penalty=0.6, max_len_offset=50,
                 use_cache=True, early_stopping=True):
        """Translate a batch of source sentences ``(B, S)``: beam search (``beam_size=1``: greedy)
        with GNMT's length penalty, outputs at most ``source length + max_len_offset`` tokens. Returns
        one list of token ids per sentence, without BOS, EOS and padding. See :mod:`aiayn.decoding`
        (``early_stopping``: its stopping rule)."""
        from .. import decoding
        return decoding.generate(self, src, src_key_padding_mask, beam_size=beam_size,
                                 length_penalty=length_penalty, max_len_offset=max_len_offset, use_cache=use_cache,
                                 early_stopping=early_stopping)

    @torch.no_grad()
    def attention_weights(self, src, tgt_in, src_key_padding_mask=None, tgt_key_padding_mask=None):
        """Per-layer attention probabilities for plots: ``{"encoder_self", "decoder_self", "cross"}``
        each a list (one per layer) of ``(B, h, Lq, Lk)`` tensors, computed on the materialising
        reference path of one teacher-forced forward (eval mode semantics: no dropout)."""
        maps = {"encoder_self": [], "decoder_self": [], "cross": []}
        modules = {}
        for i, layer in enumerate(self.encoder.layers):
            modules[layer.self_attn] = ("encoder_self", i)
        for i, layer in enumerate(self.decoder.layers):
            modules[layer.self_attn] = ("decoder_self", i)
            modules[layer.cross_attn] = ("cross", i)

        def wrap(module):
            original = module.forward

            def forward(*args, **kwargs):
                out, weights = original(*args, **dict(kwargs, need_weights=True))
                maps[modules[module][0]].append(weights)
                return out
            return original, forward

        was_training = self.training
        originals = {}
        try:
            self.eval()
            for module in modules:
                originals[module], module.forward = wrap(module)
            self(src, tgt_in, src_key_padding_mask, tgt_key_padding_mask)
        finally:
            for module, original in originals.items():
                module.forward = original
            self.train(was_training)
        return maps

    # --- safetensors files -------------------------------------------------------------------------

    def save(self, path):
        """Write the parameters to ``path`` as safetensors (the shared embedding stored once), the
        config as JSON in the file's metadata; atomically (a temporary file renamed into place)."""
        from safetensors.torch import save_model
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
        os.close(fd)
        try:
            metadata = {"aiayn_config": self.config.to_json(), "format": "pt"}
            quantized = getattr(self, "_aiayn_quantization", None)  # aiayn.quantize's mark ("bf16")
            if quantized:
                metadata["aiayn_quantization"] = quantized
            save_model(self, tmp, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @staticmethod
    def read_config(path):
        """The :class:`TransformerConfig` stored in a file written by :meth:`save`; ValueError when the
        file is missing, truncated, corrupt or not an aiayn model."""
        from safetensors import safe_open
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"Transformer.load: no such file: {path}")
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ValueError(f"Transformer.load: {path} is not a readable safetensors file "
                             f"(truncated or corrupt?): {e}") from e
        if "aiayn_config" not in metadata:
            raise ValueError(f"Transformer.load: {path} has no aiayn config in its metadata (not written by "
                             "Transformer.save)")
        try:
            return TransformerConfig.from_dict(json.loads(metadata["aiayn_config"]))
        except (ValueError, TypeError) as e:
            raise ValueError(f"Transformer.load: {path} holds an invalid config: {e}") from e

    @classmethod
    def load(cls, path, map_location="cpu"):
        """The model saved by :meth:`save` (config from the file); a model saved after
        ``aiayn.quantize(model, "bf16")`` loads in bf16, one saved after ``aiayn.quantize(model,
        "int8")`` (or ``"int8_bf16"``) with its int8 layers (CPU only), marked as such."""
        from safetensors import safe_open
        from safetensors.torch import load_model
        from ..quantization import INT8_MODES, to_int8
        model = cls(cls.read_config(path))
        with safe_open(os.fspath(path), framework="pt") as f:
            quantized = (f.metadata() or {}).get("aiayn_quantization")
        if quantized == "bf16":
            model.to(torch.bfloat16)
            model._aiayn_quantization = quantized
        elif quantized in INT8_MODES:
            if torch.device(map_location).type != "cpu":
                raise ValueError(f"Transformer.load: {path} holds an int8 model, which runs on the CPU only "
                                 f"(map_location={map_location!r})")
            to_int8(model, quantize_weights=False, mode=quantized)
            model._aiayn_quantization = quantized
        elif quantized is not None:
            raise ValueError(f"Transformer.load: {path} holds a model quantized as {quantized!r}, which this "
                             "version of aiayn cannot load")
        try:
            load_model(model, os.fspath(path), strict=True, device=str(map_location))
        except Exception as e:
            raise ValueError(f"Transformer.load: cannot read the parameters of {path} (truncated or corrupt?): "
                             f"{e}") from e
        return model.to(map_location)
