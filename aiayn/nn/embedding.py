"""Token embeddings and sinusoidal positional encodings (Vaswani et al., 2017, §3.4, §3.5)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Embeddings", "PositionalEncoding"]


class Embeddings(nn.Module):
    """Learned token embeddings multiplied by ``sqrt(d_model)`` (§3.4). Weights start as
    N(0, d_model^-1/2), so the scaled embeddings have unit variance, like the positional encodings
    they are added to; the same matrix can serve as the pre-softmax projection (weight sharing,
    §3.4)."""

    def __init__(self, vocab_size, d_model, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model, device=device, dtype=dtype))
        self.d_model = d_model
        nn.init.normal_(self.weight, 0.0, d_model ** -0.5)

    def forward(self, tokens):
        return F.embedding(tokens, self.weight) * math.sqrt(self.d_model)


class PositionalEncoding(nn.Module):
    """``PE(pos, 2i) = sin(pos / 10000^(2i/d_model))``, ``PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model))``
    (§3.5): sines at even, cosines at odd feature indices, interleaved exactly as the paper writes
    them (tensor2tensor concatenates the two halves instead). The table is computed in float64,
    cached, and extended when a longer input arrives."""

    def __init__(self, d_model, max_len=1024):
        super().__init__()
        self.d_model = d_model
        self.register_buffer("pe", self._table(max_len, d_model), persistent=False)

    @staticmethod
    def _table(length, d_model):
        pos = torch.arange(length, dtype=torch.float64)[:, None]
        div = torch.pow(10000.0, torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
        pe = torch.zeros(length, d_model, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(pos / div)
        pe[:, 1::2] = torch.cos(pos / div)[:, :d_model // 2]
        return pe.to(torch.get_default_dtype())

    def forward(self, length, start=0, dtype=None):
        """Rows ``start .. start + length - 1`` of the table, ``(length, d_model)``."""
        end = start + length
        if end > self.pe.shape[0]:
            self.pe = self._table(max(end, 2 * self.pe.shape[0]), self.d_model).to(self.pe.device)
        pe = self.pe[start:end]
        return pe if dtype is None else pe.to(dtype)
