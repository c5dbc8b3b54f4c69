"""Paper-faithful Transformer modules on aiayn's compiled ops (Vaswani et al., 2017).

    from aiayn.nn import Transformer
    model = Transformer.from_config("base", src_vocab_size=37000)
    logits = model(src, tgt_in)                  # teacher forcing, (B, T, vocab)
    model.generate(src, beam_size=4)             # beam search with a key/value cache
"""

from .attention import KVCache, MultiHeadAttention
from .backend import reference_ops, uses_compiled_ops
from .config import PRESETS, TransformerConfig
from .embedding import Embeddings, PositionalEncoding
from .feed_forward import PositionwiseFeedForward
from .sublayer import SublayerConnection
from .transformer import Decoder, DecoderLayer, Encoder, EncoderLayer, Transformer

__all__ = ["KVCache", "MultiHeadAttention", "PositionwiseFeedForward", "SublayerConnection", "Embeddings",
           "PositionalEncoding", "EncoderLayer", "DecoderLayer", "Encoder", "Decoder", "Transformer",
           "TransformerConfig", "PRESETS", "reference_ops", "uses_compiled_ops"]
