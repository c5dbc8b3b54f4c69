"""Training the Transformer (§5 of the paper): schedule, loss, token-budget batching, the Trainer,
checkpoints and the `aiayn train` run. See docs/architecture.md for the layout."""

from aiayn.train.batching import collate, micro_batches, pair_lengths, shard, token_batches
from aiayn.train.checkpoint import average_checkpoints, average_models, load_model, save_checkpoint
from aiayn.train.distributed import DistContext, init_distributed
from aiayn.train.loop import fit
from aiayn.train.loss import label_smoothed_cross_entropy
from aiayn.train.schedule import NoamLR, make_optimizer, noam_lr
from aiayn.train.trainer import Trainer, TrainOptions

__all__ = ["noam_lr", "NoamLR", "make_optimizer", "label_smoothed_cross_entropy", "token_batches", "shard",
           "micro_batches", "pair_lengths", "collate", "Trainer", "TrainOptions", "fit", "save_checkpoint",
           "load_model", "average_models", "average_checkpoints", "DistContext", "init_distributed"]
