"""Label-smoothed cross-entropy (§5.4, epsilon_ls = 0.1): the target distribution puts 1 - eps on the
reference token plus eps spread uniformly over the vocabulary (torch's `label_smoothing`
convention); padding positions do not count."""

import torch

from aiayn import functional as AF
from aiayn.nn import backend


def _check(what, logits_shape, target, epsilon):
    if logits_shape[:-1] != target.shape:
        raise ValueError(f"{what}: logits {tuple(logits_shape)} do not match "
                         f"target {tuple(target.shape)} (expected logits = target shape + (vocab,))")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"{what}: epsilon must be in [0, 1), got {epsilon}")


def label_smoothed_cross_entropy(logits, target, epsilon, ignore_index):
    """Sums over the non-padding positions: returns (smoothed loss, negative log-likelihood), both
    float32 scalars. `logits` (..., V) of any float dtype, `target` (...) int64. Divide by the number
    of non-padding tokens for a per-token loss."""
    _check("label_smoothed_cross_entropy", logits.shape, target, epsilon)
    keep = target != ignore_index
    lprobs = torch.log_softmax(logits[keep].float(), dim=-1)
    nll = -lprobs.gather(-1, target[keep].unsqueeze(-1)).sum()
    smooth = -lprobs.mean(dim=-1).sum()
    return (1.0 - epsilon) * nll + epsilon * smooth, nll


def fused_label_smoothed_cross_entropy(hidden, weight, target, epsilon, ignore_index):
    """``label_smoothed_cross_entropy(hidden @ weight.T, target, epsilon, ignore_index)`` without the
    logits: the decoder states ``hidden`` (..., d_model) and the pre-softmax projection ``weight``
    (V, d_model; ``Transformer.projection_weight``) go to ``aiayn.functional.linear_cross_entropy``
    on the non-padding positions only (padding costs no GEMM work), sums of both losses from one
    pass. Returns (smoothed loss, nll) sums as float32 scalars. Where the model's projection would
    not run on aiayn's ops (``aiayn.nn.reference_ops()``, devices without our kernels) it is the
    projection followed by ``label_smoothed_cross_entropy``. Call it inside the same autocast as
    the model: under bf16 autocast both get the cast the projection would (bf16 inputs, float32
    accumulation; the logits are not rounded to bf16 here, as they were on the unfused path)."""
    _check("fused_label_smoothed_cross_entropy", (*hidden.shape[:-1], weight.shape[0]), target, epsilon)
    keep = target != ignore_index
    h, t = hidden[keep], target[keep]
    if not backend.uses_compiled_ops(h.device, "linear"):
        return label_smoothed_cross_entropy(backend.linear(h, weight), t, epsilon, ignore_index)
    loss, nll = AF.linear_cross_entropy(h, weight, t, epsilon, ignore_index, reduction="sum", return_nll=True)
    return loss.float(), nll.float()
