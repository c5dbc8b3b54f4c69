"""Label-smoothed cross-entropy (§5.4, epsilon_ls = 0.1): the target distribution puts 1 - eps on the
reference token plus eps spread uniformly over the vocabulary (torch's `label_smoothing`
convention); padding positions do not count."""

import torch


def label_smoothed_cross_entropy(logits, target, epsilon, ignore_index):
    """Sums over the non-padding positions: returns (smoothed loss, negative log-likelihood), both
    float32 scalars. `logits` (..., V) of any float dtype, `target` (...) int64. Divide by the number
    of non-padding tokens for a per-token loss."""
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"label_smoothed_cross_entropy: logits {tuple(logits.shape)} do not match "
                         f"target {tuple(target.shape)} (expected logits = target shape + (vocab,))")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label_smoothed_cross_entropy: epsilon must be in [0, 1), got {epsilon}")
    keep = target != ignore_index
    lprobs = torch.log_softmax(logits[keep].float(), dim=-1)
    nll = -lprobs.gather(-1, target[keep].unsqueeze(-1)).sum()
    smooth = -lprobs.mean(dim=-1).sum()
    return (1.0 - epsilon) * nll + epsilon * smooth, nll
