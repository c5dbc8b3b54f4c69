"""One optimizer step at a time (§5): a token-budget batch, this rank's shard of it in micro-batches
(gradient accumulation), label-smoothed cross-entropy (fused with the pre-softmax projection: the
logits are never formed whole) normalized by the batch's target tokens over all ranks, optional
bf16 autocast and gradient clipping, Adam with the warm-up schedule. The state (optimizer,
scheduler, RNG, data position) round-trips exactly, so a resumed run computes the same losses as an
uninterrupted one."""

import contextlib
import inspect
from dataclasses import asdict, dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from aiayn.train.batching import collate, micro_batches, pair_lengths, shard, token_batches
from aiayn.train.distributed import DistContext, all_gather_objects, all_reduce_sum
from aiayn.train.loss import fused_label_smoothed_cross_entropy, label_smoothed_cross_entropy
from aiayn.train.schedule import NoamLR, make_optimizer


@dataclass
class TrainOptions:
    """How to train (the model's own shape lives in its TransformerConfig)."""
    max_tokens: int = 4096           # padded source + target tokens per optimizer step, all ranks together
    micro_tokens: int = 0            # per forward pass (memory bound); 0 = this rank's whole share
    warmup: int = 4000               # §5.3
    lr_scale: float = 1.0            # factor on the paper's learning rate
    clip_norm: float = 0.0           # gradient-norm clipping; 0 = off
    bf16: bool = False               # bf16 autocast (CPU and CUDA)
    seed: int = 1                    # batch order (dropout draws from torch's generator)

    def to_dict(self):
        return asdict(self)


class Trainer:
    """Trains `model` (an aiayn.nn.Transformer) on (source ids, target ids) pairs. Under a process
    group (`ctx.world_size` > 1) every rank holds the same pairs, builds the same batches and trains
    on its shard; DDP averages the gradients.

    ``fused_loss`` (default): the loss takes the decoder's final states and the projection matrix
    (``aiayn.functional.linear_cross_entropy`` on the non-padding positions) instead of full logits;
    False computes the logits and ``label_smoothed_cross_entropy`` on them (same values up to
    rounding; kept for comparison)."""

    def __init__(self, model, pairs, options=None, device="cpu", ctx=None, fused_loss=True):
        self.options = options or TrainOptions()
        self.ctx = ctx or DistContext()
        self.device = torch.device(device)
        self.model = model.to(self.device)
        cfg = model.config
        self.pad_id, self.bos_id, self.eos_id = cfg.pad_id, cfg.bos_id, cfg.eos_id
        self.label_smoothing = cfg.label_smoothing
        self.fused_loss = fused_loss
        self.pairs = pairs
        self.lengths = pair_lengths(pairs)
        self.forward = model
        if self.ctx.active:
            # no buffer sync per forward: ranks may run different numbers of micro-batches, and a
            # collective per forward would then mismatch (the model has no running buffers).
            no_sync = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})
            self.forward = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None, **no_sync)
        self.optimizer = make_optimizer(model.parameters())
        self.scheduler = NoamLR(self.optimizer, cfg.d_model, self.options.warmup, self.options.lr_scale)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self._plan = None

    # -- data ---------------------------------------------------------------------------------
    def _epoch_plan(self):
        if self._plan is None:
            self._plan = token_batches(self.lengths, self.options.max_tokens, seed=self.options.seed,
                                       epoch=self.epoch, min_sentences=self.ctx.world_size)
        return self._plan

    def _next_batch(self):
        plan = self._epoch_plan()
        if self.batch_in_epoch >= len(plan):
            self.epoch, self.batch_in_epoch, self._plan = self.epoch + 1, 0, None
            plan = self._epoch_plan()
        batch = plan[self.batch_in_epoch]
        self.batch_in_epoch += 1
        return batch

    def _autocast(self):
        if not self.options.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    # -- training -----------------------------------------------------------------------------
    def _loss(self, forward, src, tgt_in, tgt_out):
        """(smoothed loss, nll) sums over the target tokens of one micro-batch. The decoder states
        come through `forward` (the DDP wrapper when distributed: its hooks see the call); the
        fused loss runs under the same autocast as the projection it replaces."""
        with self._autocast():
            if self.fused_loss:
                hidden = forward(src, tgt_in, return_hidden=True)
                return fused_label_smoothed_cross_entropy(hidden, self.model.projection_weight, tgt_out,
                                                          self.label_smoothing, self.pad_id)
            logits = forward(src, tgt_in)
        return label_smoothed_cross_entropy(logits, tgt_out, self.label_smoothing, self.pad_id)

    def train_step(self):
        """One optimizer step; returns {step, loss, nll, lr, tokens, target_tokens, grad_norm}, the
        losses per target token over the whole batch (all ranks)."""
        batch = self._next_batch()
        target_tokens = sum(self.lengths[i][1] for i in batch)
        tokens = sum(self.lengths[i][0] + self.lengths[i][1] for i in batch)
        mine = shard(batch, self.lengths, self.ctx.rank, self.ctx.world_size)
        micro_tokens = self.options.micro_tokens or self.options.max_tokens
        pieces = micro_batches(mine, self.lengths, micro_tokens)
        lr = self.optimizer.param_groups[0]["lr"]

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; scaling by world_size / all target tokens makes the
        # result the gradient of the per-token loss of the whole batch.
        scale = self.ctx.world_size / target_tokens
        loss_sum = nll_sum = 0.0
        for n, piece in enumerate(pieces):
            src, tgt_in, tgt_out = collate([self.pairs[i] for i in piece], self.pad_id, self.bos_id,
                                           self.eos_id, self.device)
            last = n == len(pieces) - 1
            sync = contextlib.nullcontext() if last or not self.ctx.active else self.forward.no_sync()
            with sync:
                loss, nll = self._loss(self.forward, src, tgt_in, tgt_out)
                (loss * scale).backward()
            loss_sum += loss.item()
            nll_sum += nll.item()
        grad_norm = None
        if self.options.clip_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.options.clip_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        loss_sum, nll_sum = all_reduce_sum([loss_sum, nll_sum], self.ctx, self.device)
        return {"step": self.step, "loss": loss_sum / target_tokens, "nll": nll_sum / target_tokens,
                "lr": lr, "tokens": tokens, "target_tokens": target_tokens, "grad_norm": grad_norm}

    @torch.no_grad()
    def evaluate(self, pairs, max_tokens=None):
        """(label-smoothed loss, nll) per target token of `pairs`, in eval mode (no dropout)."""
        self.model.eval()
        lengths = pair_lengths(pairs)
        loss_sum = nll_sum = 0.0
        tokens = 0
        for piece in micro_batches(range(len(pairs)), lengths, max_tokens or self.options.max_tokens):
            src, tgt_in, tgt_out = collate([pairs[i] for i in piece], self.pad_id, self.bos_id, self.eos_id,
                                           self.device)
            loss, nll = self._loss(self.model, src, tgt_in, tgt_out)
            loss_sum, nll_sum = loss_sum + loss.item(), nll_sum + nll.item()
            tokens += sum(lengths[i][1] for i in piece)
        return loss_sum / tokens, nll_sum / tokens

    # -- state --------------------------------------------------------------------------------
    def _rng_state(self):
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def state_dict(self):
        """Everything but the model parameters needed to continue exactly: call on every rank
        (it gathers each rank's RNG state)."""
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": all_gather_objects(self._rng_state(), self.ctx), "options": self.options.to_dict()}

    def load_state_dict(self, state):
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self._plan = None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"][self.ctx.rank if self.ctx.rank < len(state["rng"]) else 0]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
