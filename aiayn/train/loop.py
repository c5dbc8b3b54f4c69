"""The training loop around a Trainer: progress bar (loss, tokens/s, lr), the JSON log, periodic
validation (one line each), the best checkpoint by dev BLEU (or dev loss), checkpoints (rank 0 writes
them), stops by steps, epochs, training time or early stopping, the loss and BLEU curves at the end.

The log ({"train": [...], "valid": [...], "elapsed": seconds, "best": {...}}) travels inside every
checkpoint's training state, so elapsed training time, the best score and the early-stopping
count survive --resume."""

import json
import os
import sys
import time

from aiayn.train.checkpoint import BEST, BEST_INFO, atomic_write, save_checkpoint
from aiayn.train.distributed import all_reduce_sum, barrier
from aiayn.train.plots import plot_bleu_curve, plot_loss_curve

LOG_NAME, CURVE_NAME, BLEU_CURVE_NAME = "log.json", "loss_curve.png", "bleu_curve.png"

# Wall-clock seconds; a module attribute so tests can drive --max-time with a fake clock.
_clock = time.monotonic

STOP_MESSAGES = {"steps": "reached --steps", "max_epochs": "reached --max-epochs",
                 "max_time": "reached --max-time", "early_stop": "no new best for --early-stop validations"}


def new_log():
    return {"train": [], "valid": []}


def write_checkpoint(trainer, out_dir, log, keep_last=0):
    """Every rank calls this (the state gathers each rank's RNG); rank 0 writes."""
    state = trainer.state_dict()
    state["log"] = log
    if trainer.ctx.is_main:
        save_checkpoint(out_dir, trainer.step, trainer.model, state, keep_last=keep_last or None)
    barrier(trainer.ctx)


def dump_log(log, out_dir):
    """log.json alone (no plots): cheap enough for every validation, so a long run's progress can
    be read while it trains; returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, LOG_NAME)

    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(log, f, indent=1)

    atomic_write(log_path, dump)
    return log_path


def write_log(log, out_dir, title="training loss"):
    """log.json, loss_curve.png and (when dev BLEU was measured) bleu_curve.png in out_dir; returns
    the paths of the first two."""
    log_path, curve_path = dump_log(log, out_dir), os.path.join(out_dir, CURVE_NAME)
    plot_loss_curve(log, curve_path, title=title)
    if any(e.get("bleu") is not None for e in log.get("valid", [])):
        plot_bleu_curve(log, os.path.join(out_dir, BLEU_CURVE_NAME), title=title)
    return log_path, curve_path


class BestTracker:
    """The best validation so far and how many validations since brought none better: by dev BLEU
    (higher is better) where it was measured, else by dev loss (lower is better). Ties are no
    improvement, so early stopping is not held off by a plateau. Round-trips through state_dict."""

    def __init__(self, state=None):
        state = state or {}
        self.metric, self.score = state.get("metric"), state.get("score")
        self.step, self.epoch = state.get("step"), state.get("epoch")
        self.bad = state.get("bad", 0)

    def update(self, result):
        """Records a validation result (a dict with step and loss, maybe bleu); True when it is the
        new best."""
        metric = "bleu" if result.get("bleu") is not None else "loss"
        if result.get(metric) is None:
            return False
        value = result[metric]
        if metric != self.metric:  # the run switched between BLEU and loss: scores do not compare
            self.metric, self.score, self.bad = metric, None, 0
        better = self.score is None or (value > self.score if metric == "bleu" else value < self.score)
        if better:
            self.score, self.step, self.epoch, self.bad = value, result.get("step"), result.get("epoch"), 0
        else:
            self.bad += 1
        return better

    def state_dict(self):
        return {"metric": self.metric, "score": self.score, "step": self.step, "epoch": self.epoch, "bad": self.bad}


def epochs_done(trainer):
    """Passes over the training pairs so far, fractional (2.5 = half-way through the third)."""
    # The Trainer moves to the next epoch only when it draws the next batch, so a finished epoch
    # shows as batch_in_epoch == len(plan); the plan is cached and deterministic (no RNG drawn).
    return trainer.epoch + trainer.batch_in_epoch / max(1, len(trainer._epoch_plan()))


def format_duration(seconds):
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m{rest % 60:02d}s" if h else f"{rest // 60}m{rest % 60:02d}s"


def format_valid(result):
    """The one line a validation prints: step, epoch, elapsed, tokens/s, dev loss, perplexity, BLEU."""
    parts = [f"valid step={result['step']}"]
    if result.get("epoch") is not None:
        parts.append(f"epoch={result['epoch']:.2f}")
    if result.get("elapsed") is not None:
        parts.append(f"elapsed={format_duration(result['elapsed'])}")
    if result.get("tokens_per_s") is not None:
        parts.append(f"tok/s={result['tokens_per_s']:.0f}")
    for key, fmt in (("loss", ".4f"), ("ppl", ".2f"), ("bleu", ".2f")):
        if result.get(key) is not None:
            parts.append(f"{key}={result[key]:{fmt}}")
    if result.get("best"):
        parts.append("(new best)")
    return " ".join(parts)


def _save_best(trainer, out_dir, result, tracker):
    trainer.model.save(os.path.join(out_dir, BEST))
    info = {**tracker.state_dict(), "elapsed": result.get("elapsed"), "file": BEST}
    info.pop("bad")

    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(info, f, indent=1)

    atomic_write(os.path.join(out_dir, BEST_INFO), dump)


def _any_rank(flag, trainer):
    """True on every rank when `flag` is true on any (ranks must agree on when to stop)."""
    if not trainer.ctx.active:
        return flag
    return all_reduce_sum([1.0 if flag else 0.0], trainer.ctx, trainer.device)[0] > 0


def fit(trainer, steps, *, log=None, out_dir=None, save_every=0, keep_last=0, validate=None, valid_every=0,
        valid_every_epoch=False, max_epochs=None, max_seconds=None, early_stop=None, progress=True, desc="train"):
    """Trains until trainer.step == steps, or `max_epochs` passes over the data, or `max_seconds`
    of training (counted across resumes through log["elapsed"]), or `early_stop` validations
    without a new best. `validate()` returns a dict (loss, nll, ppl, bleu) recorded with step,
    epoch, elapsed time and tokens/s every `valid_every` steps, at each epoch's end when
    `valid_every_epoch`, and at the stop; checkpoints every `save_every` steps and at the stop when
    out_dir is given, plus best.safetensors / best.json on each new best. Returns the log, whose
    "stopped" says why it stopped (a key of STOP_MESSAGES)."""
    from tqdm import tqdm

    log = new_log() if log is None else log
    main = trainer.ctx.is_main
    tracker = BestTracker(log.get("best"))
    elapsed_before = log.get("elapsed", 0.0)
    start = _clock()

    def elapsed():
        return elapsed_before + (_clock() - start)

    def stop_reason():
        if trainer.step >= steps:
            return "steps"
        if max_epochs is not None and epochs_done(trainer) >= max_epochs:
            return "max_epochs"
        if max_seconds is not None and _any_rank(elapsed() >= max_seconds, trainer):
            return "max_time"
        return None

    reason = stop_reason()
    log["stopped"] = None
    bar = tqdm(total=steps, initial=trainer.step, desc=desc, disable=not (progress and main) or reason is not None,
               file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    window_tokens, window_start = 0, _clock()
    valid_tokens, valid_seconds = 0, 0.0      # training throughput since the previous validation
    while reason is None:
        step_start = _clock()
        stats = trainer.train_step()
        now = _clock()
        window_tokens += stats["tokens"]
        valid_tokens += stats["tokens"]
        valid_seconds += now - step_start
        entry = {k: stats[k] for k in ("step", "loss", "nll", "lr", "tokens")}
        entry["seconds"] = round(elapsed(), 3)
        log["train"].append(entry)
        log["elapsed"] = elapsed()
        if now - window_start > 0.5:
            bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{window_tokens / (now - window_start):.0f}",
                            lr=f"{stats['lr']:.2e}", refresh=False)
            window_tokens, window_start = 0, now
        bar.update(1)
        reason = stop_reason()
        epoch_end = trainer.batch_in_epoch >= len(trainer._epoch_plan())
        if validate is not None and ((valid_every and trainer.step % valid_every == 0)
                                     or (valid_every_epoch and epoch_end) or reason is not None):
            result = {"step": trainer.step, "epoch": round(epochs_done(trainer), 4), "elapsed": round(elapsed(), 3),
                      "tokens_per_s": round(valid_tokens / valid_seconds, 1) if valid_seconds > 0 else None,
                      **validate()}
            valid_tokens, valid_seconds = 0, 0.0
            if main:
                result["best"] = tracker.update(result)
                log["best"] = tracker.state_dict()
                if result["best"] and out_dir:
                    _save_best(trainer, out_dir, result, tracker)
                bar.write(format_valid(result), file=sys.stderr)
            log["valid"].append(result)
            log["elapsed"] = elapsed()
            if main and out_dir:
                dump_log(log, out_dir)
            if early_stop and _any_rank(main and tracker.bad >= early_stop, trainer) and reason is None:
                reason = "early_stop"
        if out_dir and ((save_every and trainer.step % save_every == 0) or reason is not None):
            log["stopped"] = reason
            write_checkpoint(trainer, out_dir, log, keep_last)
    log["stopped"] = reason
    bar.close()
    return log
