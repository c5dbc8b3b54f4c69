"""The residual connection around each sub-layer (Vaswani et al., 2017, §3.1, §5.4)."""

import torch.nn as nn
import torch.nn.functional as F

from . import backend

__all__ = ["SublayerConnection"]


class SublayerConnection(nn.Module):
    """``LayerNorm(x + Dropout(Sublayer(x)))`` (§3.1 with §5.4's residual dropout), the paper's
    post-LN, in one fused kernel (residual add + dropout + LayerNorm). With ``norm_first=True`` the
    pre-LN variant ``x + Dropout(Sublayer(LayerNorm(x)))`` (Wang et al., 2019; not the paper's)."""

    def __init__(self, d_model, dropout, norm_first=False, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps, device=device, dtype=dtype)
        self.dropout, self.norm_first = dropout, norm_first

    def forward(self, x, sublayer):
        p = self.dropout if self.training else 0.0
        if self.norm_first:
            return x + F.dropout(sublayer(self.norm(x)), p, self.training)
        return backend.add_dropout_layer_norm(sublayer(x), x, self.norm.weight, self.norm.bias, p, self.norm.eps,
                                              self.training)
