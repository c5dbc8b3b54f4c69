"""The training loop around a Trainer: progress bar (loss, tokens/s, lr), the JSON log, periodic
validation and checkpoints (rank 0 writes them), the loss curve at the end."""

import json
import os
import sys
import time

from aiayn.train.checkpoint import atomic_write, save_checkpoint
from aiayn.train.distributed import barrier
from aiayn.train.plots import plot_loss_curve

LOG_NAME, CURVE_NAME = "log.json", "loss_curve.png"


def new_log():
    return {"train": [], "valid": []}


def write_checkpoint(trainer, out_dir, log, keep_last=0):
    """Every rank calls this (the state gathers each rank's RNG); rank 0 writes."""
    state = trainer.state_dict()
    state["log"] = log
    if trainer.ctx.is_main:
        save_checkpoint(out_dir, trainer.step, trainer.model, state, keep_last=keep_last or None)
    barrier(trainer.ctx)


def write_log(log, out_dir, title="training loss"):
    """log.json and loss_curve.png in out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    log_path, curve_path = os.path.join(out_dir, LOG_NAME), os.path.join(out_dir, CURVE_NAME)

    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(log, f, indent=1)

    atomic_write(log_path, dump)
    plot_loss_curve(log, curve_path, title=title)
    return log_path, curve_path


def fit(trainer, steps, *, log=None, out_dir=None, save_every=0, keep_last=0, validate=None, valid_every=0,
        progress=True, desc="train"):
    """Trains until trainer.step == steps. `validate()` returns a dict (e.g. loss, bleu) recorded
    with its step every `valid_every` steps and at the end; checkpoints every `save_every` steps and
    at the end when out_dir is given. Returns the log."""
    from tqdm import tqdm

    log = new_log() if log is None else log
    main = trainer.ctx.is_main
    bar = tqdm(total=steps, initial=trainer.step, desc=desc, disable=not (progress and main), file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    start = time.perf_counter()
    window_tokens, window_start = 0, start
    while trainer.step < steps:
        stats = trainer.train_step()
        now = time.perf_counter()
        window_tokens += stats["tokens"]
        entry = {k: stats[k] for k in ("step", "loss", "nll", "lr", "tokens")}
        entry["seconds"] = round(now - start, 3)
        log["train"].append(entry)
        if now - window_start > 0.5:
            bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{window_tokens / (now - window_start):.0f}",
                            lr=f"{stats['lr']:.2e}", refresh=False)
            window_tokens, window_start = 0, now
        bar.update(1)
        last = trainer.step == steps
        if validate is not None and valid_every and (trainer.step % valid_every == 0 or last):
            result = {"step": trainer.step, **validate()}
            log["valid"].append(result)
            if main:
                bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in result.items()), file=sys.stderr)
        if out_dir and save_every and (trainer.step % save_every == 0 or last):
            write_checkpoint(trainer, out_dir, log, keep_last)
    bar.close()
    return log
