"""int8 weights of a quantized model (``aiayn.quantize(model, "int8")``): :class:`Int8Linear` holds a
linear layer's int8 weight, per output channel scales and float32 bias as buffers, and runs
:func:`aiayn.functional.linear_int8` on a packed copy of the weight made once (not saved: it is
rebuilt from the int8 weight after a load, and again whenever the weight is written in place)."""

import torch
import torch.nn as nn

from .. import functional as AF
from .. import reference
from . import backend

__all__ = ["Int8Linear"]


class Int8Linear(nn.Module):
    """``act(x W^T + b)`` with W int8 per output channel (``weight``, ``scale``) and activations
    quantized per row on the fly; float32 in (bf16 widened) and out, CPU only."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)
        # (first row, rows) -> (key of the weight it was made from, (weight, scale, bias, packed) of those rows)
        self._packed = {}

    @classmethod
    def from_float(cls, weight, bias=None):
        """The int8 layer of a float ``(out_features, in_features)`` weight (and bias)."""
        m = cls(weight.shape[1], weight.shape[0], bias is not None)
        w_q, scale = reference.quantize_weight_int8(weight)
        m.weight.copy_(w_q)
        m.scale.copy_(scale)
        if bias is not None:
            m.bias.copy_(bias.detach().to(torch.float32))
        return m

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def _weight_key(self):
        w = self.weight
        try:
            version = w._version
        except RuntimeError:  # inference tensors have no version counter (and cannot be written)
            version = -1
        return (w.data_ptr(), version)

    def rows(self, first, count):
        """``(weight, scale, bias, packed)`` of output rows [first, first + count): the slices the
        attention's packed Q/K/V projection uses, each packed once (and again after the weight is
        written in place, e.g. by load_state_dict)."""
        key = (first, count)
        entry = self._packed.get(key)
        wkey = self._weight_key()
        if entry is None or entry[0] != wkey:
            end = first + count
            w = self.weight if key == (0, self.out_features) else self.weight[first:end]
            b = None if self.bias is None else self.bias[first:end]
            entry = (wkey, (w, self.scale[first:end], b, AF.linear_int8_pack(w)))
            self._packed[key] = entry
        return entry[1]

    def forward(self, x, activation=None, first=0, count=None):
        """``x`` through output rows [first, first + count) (all by default)."""
        w, scale, b, packed = self.rows(first, self.out_features - first if count is None else count)
        if x.device.type != "cpu":
            raise ValueError(f"Int8Linear: x is on {x.device}; int8 inference runs on the CPU only")
        if backend.uses_compiled_ops(x.device, "linear"):
            # The op itself, not AF.linear_int8: these buffers are valid by construction, and a
            # decoding step makes ~6 calls per layer, where Python checks would show.
            return torch.ops.aiayn.linear_int8(x, w, scale, b, activation == "relu", packed)
        return reference.linear_int8(x, w, scale, b, activation)
