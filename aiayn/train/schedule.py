"""The optimizer and learning-rate schedule of §5.3: Adam with beta1 = 0.9, beta2 = 0.98, eps = 1e-9,
and lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5) (linear warm-up, then inverse square
root decay)."""

import torch


def noam_lr(step, d_model, warmup=4000):
    """The paper's learning rate at optimizer step `step` (1-based)."""
    if step < 1:
        raise ValueError(f"noam_lr: step must be >= 1 (1-based), got {step}")
    if warmup < 1:
        raise ValueError(f"noam_lr: warmup must be >= 1, got {warmup}")
    return d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


class NoamLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose factor is `scale * noam_lr(step)`: build the optimizer with lr=1.0. The n-th
    optimizer.step() (n = 1, 2, ...) runs with noam_lr(n); call scheduler.step() after each."""

    def __init__(self, optimizer, d_model, warmup=4000, scale=1.0, last_epoch=-1):
        self.d_model, self.warmup, self.scale = d_model, warmup, scale
        super().__init__(optimizer, self._factor, last_epoch=last_epoch)

    def _factor(self, completed_steps):
        return self.scale * noam_lr(completed_steps + 1, self.d_model, self.warmup)

    def state_dict(self):
        # the factor is a bound method (not picklable); it is rebuilt from d_model/warmup/scale
        state = super().state_dict()
        state["lr_lambdas"] = [None] * len(state["lr_lambdas"])
        return state


def make_optimizer(parameters, betas=(0.9, 0.98), eps=1e-9):
    """Adam as in §5.3, with lr=1.0 so that NoamLR's factor is the learning rate.

    torch's fused implementation (one pass over all parameters' tensors; torch >= 2.4 on the CPU):
    one step over the Multi30k-size model's 7.6M parameters (3+3 layers, d_model 256, vocabulary
    8000) took 17 ms, against 85 ms with ``foreach=True`` and 116 ms for torch's default per-tensor
    loop (2-core Zen 4, medians, interleaved). Where fused Adam is unavailable (older torch, a
    device without it) ``foreach`` is used. Its state dict round-trips like the others, so resume
    stays exact."""
    parameters = list(parameters)
    try:
        optimizer = torch.optim.Adam(parameters, lr=1.0, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(parameters, lr=1.0, betas=betas, eps=eps, foreach=True)
    optimizer.register_step_post_hook(_mark_parameters_changed)
    return optimizer


def _mark_parameters_changed(optimizer, args, kwargs):
    """torch's fused Adam (CPU, torch 2.14) writes the parameters without bumping their version
    counters, so everything keyed on ``w._version`` would keep seeing the old weights: above all
    the packed-weight cache of linear / feed_forward (``aiayn.packed_weight_cache``, on while
    decoding), which then decoded every validation after the first with the weights of that first
    one (dev BLEU flat while dev perplexity fell). Bump them as any in-place update would."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            torch.autograd.graph.increment_version(p)
