"""The position-wise feed-forward network (Vaswani et al., 2017, §3.3)."""

import torch.nn as nn

from . import backend

__all__ = ["PositionwiseFeedForward"]


class PositionwiseFeedForward(nn.Module):
    """``FFN(x) = max(0, x W_1 + b_1) W_2 + b_2`` (§3.3), applied to each position alike, on aiayn's
    fused feed-forward op (bias, ReLU and dropout in the first GEMM's epilogue). ``dropout`` acts on
    the hidden activation (tensor2tensor's ``relu_dropout``; not in the paper, 0 by default)."""

    # Set on the instance by aiayn.quantize(model, "int8"), which makes w_1 / w_2 Int8Linear modules:
    # two int8 linears then, the ReLU in the first one's epilogue (inference: no dropout).
    int8 = False

    def __init__(self, d_model, d_ff, dropout=0.0, device=None, dtype=None):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w_2 = nn.Linear(d_ff, d_model, device=device, dtype=dtype)
        self.dropout = dropout

    def forward(self, x):
        if self.int8:
            return self.w_2(self.w_1(x, "relu"))
        return backend.feed_forward(x, self.w_1.weight, self.w_1.bias, self.w_2.weight, self.w_2.bias,
                                    self.dropout, self.training)
