"""`aiayn train`: parallel text files in, a shared sentencepiece vocabulary, the Transformer trained
with the paper's recipe (§5), dev-set loss, perplexity and BLEU, checkpoints (the newest, the best),
log, loss and BLEU curves out; stops by steps, epochs, training time or early stopping, and
--resume continues exactly. Model and options come from a preset < a config file < flags
(config_file.py). Runs unchanged under `torchrun --nproc_per_node N`."""

import dataclasses
import json
import math
import os
import sys
from dataclasses import field, dataclass

import torch

from aiayn.data import Vocabulary, corpus_bleu, read_parallel
from aiayn.errors import UserInputError
from aiayn.train.checkpoint import (BEST, atomic_write, check_config, checkpoint_steps, load_model, load_state, model_path,
                                    state_path)
from aiayn.train.config_file import resolve
from aiayn.train.distributed import barrier, init_distributed
from aiayn.train.loop import STOP_MESSAGES, epochs_done, fit, format_duration, new_log, write_log
from aiayn.train.trainer import Trainer, TrainOptions

VOCAB_NAME, RUN_INFO = "vocab.model", "run.json"


@dataclass
class RunArgs:
    out: str
    src: str = None                  # training / dev files; on --resume the run's (run.json) by default
    tgt: str = None
    valid_src: str = None
    valid_tgt: str = None
    config: str = None               # a preset name or a .json / .toml config file
    preset: str = None               # a preset name (also what --config NAME means)
    model: dict = field(default_factory=dict)   # TransformerConfig fields set by flags (over preset and file)
    train: dict = field(default_factory=dict)   # TrainSettings fields set by flags (over the file)
    vocab: str = None                # an existing sentencepiece model instead of learning one
    resume: bool = False
    device: str = None
    progress: bool = True


def pick_device(name, local_rank=0):
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError("--device cuda: no CUDA device is available")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise UserInputError(f"--device must be cpu or cuda, not {name!r}")
    return torch.device("cpu")


def encode_pairs(vocab, src_lines, tgt_lines, max_len):
    """Token-id pairs; pairs longer than the model's max_len - 1 are dropped (returns pairs, dropped)."""
    pairs, dropped = [], 0
    for s, t in zip(src_lines, tgt_lines):
        si, ti = vocab.encode(s), vocab.encode(t)
        if len(si) >= max_len or len(ti) >= max_len:
            dropped += 1
        else:
            pairs.append((si, ti))
    return pairs, dropped


def _say(ctx, *parts):
    if ctx.is_main:
        print(*parts, file=sys.stderr, flush=True)


def _read_run_info(out):
    path = os.path.join(out, RUN_INFO)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserInputError(f"{path!r} is unreadable or corrupt ({e})") from None


def _write_json(path, obj):
    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    atomic_write(path, dump)


def _data_paths(a, run_info):
    """--src / --tgt / --valid-src / --valid-tgt, on --resume defaulting to the run's."""
    train, valid = run_info.get("train") or [None, None], run_info.get("valid") or [None, None]
    paths = {"src": a.src or train[0], "tgt": a.tgt or train[1],
             "valid_src": a.valid_src or valid[0], "valid_tgt": a.valid_tgt or valid[1]}
    missing = [f"--{k.replace('_', '-')}" for k, v in paths.items() if not v]
    if missing:
        raise UserInputError(f"{', '.join(missing)} required (a resumed run takes the files named in its "
                             f"{RUN_INFO})")
    return paths


def _resume_mismatch(run_config, asked, sources):
    """The model fields where the flags / config file ask for another value than the run has."""
    diff = []
    for k in sorted(set(run_config) | set(asked)):
        if run_config.get(k) != asked.get(k):
            diff.append(f"{k}: the run has {run_config.get(k)!r}, asked for {asked.get(k)!r}"
                        + (f" (from {sources[k]})" if k in sources else ""))
    return "; ".join(diff)


def _valid_set(vocab, src_lines, tgt_lines, max_len):
    """Dev pairs that fit the model and their reference sentences, kept aligned."""
    pairs, refs = [], []
    for s, t in zip(src_lines, tgt_lines):
        si, ti = vocab.encode(s), vocab.encode(t)
        if len(si) < max_len and len(ti) < max_len:
            pairs.append((si, ti))
            refs.append(t)
    return pairs, refs


def run_training(a):
    """Trains per `a` (RunArgs); returns the final log. Every check of the user's input happens
    before anything is written into the run directory."""
    from aiayn.nn import Transformer

    device_type = pick_device(a.device).type
    ctx = init_distributed(device_type)
    device = pick_device(a.device, ctx.local_rank)
    steps_done = checkpoint_steps(a.out)
    if steps_done and not a.resume:
        raise UserInputError(f"{a.out!r} already holds checkpoints (up to step {steps_done[-1]}); pass --resume "
                             "to continue that run, or choose another --out")
    resuming = a.resume and bool(steps_done)
    run_info, model, state = {}, None, None
    if resuming:
        step = steps_done[-1]
        run_info = _read_run_info(a.out)
        model = load_model(model_path(a.out, step))
        state = load_state(state_path(a.out, step))
        if state.get("step") != step:
            raise UserInputError(f"training state {state_path(a.out, step)!r} belongs to step {state.get('step')}, "
                                 f"not {step}")
    run_config = model.config.to_dict() if model is not None else None
    # a resumed run keeps its validation, checkpoint and stopping settings unless told otherwise
    resolved = resolve(a.config, a.preset, a.model, a.train, run_config, run_info.get("settings"))
    settings = resolved.settings
    # the model's fields are checked now (with a stand-in vocabulary size), before a vocabulary is learned
    resolved.transformer_config(run_config["src_vocab_size"] if run_config else 64)
    if run_config is not None:
        asked = resolved.transformer_config(run_config["src_vocab_size"]).to_dict()
        diff = _resume_mismatch(run_config, asked, resolved.sources)
        if diff:
            raise UserInputError(f"--resume: {model_path(a.out, steps_done[-1])!r} holds a model of another "
                                 f"config than the one asked for: {diff}")
    paths = _data_paths(a, run_info)
    src_lines, tgt_lines = read_parallel(paths["src"], paths["tgt"])
    valid_src, valid_tgt = read_parallel(paths["valid_src"], paths["valid_tgt"])
    if a.vocab and not os.path.isfile(os.path.join(a.out, VOCAB_NAME)):
        Vocabulary(a.vocab)  # validates it before the run directory is made

    os.makedirs(a.out, exist_ok=True)
    vocab_path = os.path.join(a.out, VOCAB_NAME)
    if not os.path.isfile(vocab_path):
        if ctx.is_main:
            if a.vocab:
                import shutil

                shutil.copyfile(a.vocab, vocab_path)
            else:
                _say(ctx, f"learning a shared {settings.vocab_type} vocabulary of up to {settings.vocab_size} pieces ...")
                Vocabulary.train([paths["src"], paths["tgt"]], vocab_path[:-len(".model")], settings.vocab_size,
                                 settings.vocab_type)
        barrier(ctx)
    vocab = Vocabulary(vocab_path)

    config = resolved.transformer_config(len(vocab))
    pairs, dropped = encode_pairs(vocab, src_lines, tgt_lines, config.max_len)
    if not pairs:
        raise UserInputError(f"no training pair is shorter than the model's max_len ({config.max_len} tokens)")
    if dropped:
        _say(ctx, f"dropped {dropped} training pairs longer than {config.max_len - 1} tokens")
    valid_pairs, valid_refs = _valid_set(vocab, valid_src, valid_tgt, config.max_len)
    if not valid_pairs:
        raise UserInputError(f"no dev pair is shorter than the model's max_len ({config.max_len} tokens)")

    options = settings.options()
    log = new_log()
    described = resolved.config_file or resolved.preset or "the resumed run's config"
    if resuming:
        check_config(model, config, model_path(a.out, steps_done[-1]))
        run_options = TrainOptions(**state["options"])
        ignored = [f"{resolved.sources[k]} {k}={v!r} (the run's: {getattr(run_options, k)!r})"
                   for k, v in options.to_dict().items() if k in resolved.sources and getattr(run_options, k) != v]
        if ignored:
            _say(ctx, "note: a resumed run keeps its training options; ignoring " + ", ".join(ignored))
        options = run_options
        log = state.get("log", log)
        if ctx.is_main and run_info and run_info.get("settings") != dataclasses.asdict(settings):
            run_info["settings"] = dataclasses.asdict(settings)
            _write_json(os.path.join(a.out, RUN_INFO), run_info)
        _say(ctx, f"resuming from step {state['step']} after {format_duration(log.get('elapsed', 0.0))} of "
                  f"training (training options of that run: {options.to_dict()})")
    else:
        torch.manual_seed(options.seed)
        model = Transformer(config)
        if ctx.is_main:
            _write_json(os.path.join(a.out, RUN_INFO), {
                "config": config.to_dict(), "options": options.to_dict(), "vocab": VOCAB_NAME,
                "train": [paths["src"], paths["tgt"]], "valid": [paths["valid_src"], paths["valid_tgt"]],
                "preset": resolved.preset, "config_file": resolved.config_file,
                "settings": dataclasses.asdict(settings)})
    trainer = Trainer(model, pairs, options, device, ctx)
    if state is not None:
        trainer.load_state_dict(state)
    _say(ctx, f"{len(pairs)} training pairs, {len(valid_pairs)} dev pairs, vocabulary {len(vocab)}, "
              f"config {described}, {sum(p.numel() for p in model.parameters())} parameters, "
              f"{ctx.world_size} rank(s), {device}")

    def validate():
        if not ctx.is_main:
            return {}
        loss, nll = trainer.evaluate(valid_pairs)
        result = {"loss": loss, "nll": nll, "ppl": math.exp(min(nll, 100.0))}
        if settings.bleu_sentences:
            subset = valid_pairs[:settings.bleu_sentences]
            from aiayn.translate import translate_ids  # here: aiayn.translate imports this module

            hyps = translate_ids(model, [s for s, _ in subset], beam=settings.beam, alpha=settings.alpha,
                                 batch_size=64)
            result["bleu"] = corpus_bleu([vocab.decode(h) for h in hyps], valid_refs[:len(subset)])
        return result

    first_step = trainer.step
    log = fit(trainer, settings.steps, log=log, out_dir=a.out, save_every=settings.save_every,
              keep_last=settings.keep_last, validate=validate, valid_every=settings.valid_every,
              valid_every_epoch=settings.valid_every_epoch, max_epochs=settings.max_epochs,
              max_seconds=settings.max_time * 60 if settings.max_time else None, early_stop=settings.early_stop,
              progress=a.progress)
    if not ctx.is_main:
        return log
    reason = log.get("stopped")
    if trainer.step == first_step:
        limit = {"steps": "steps", "max_epochs": "max_epochs", "max_time": "max_time"}.get(reason)
        value = f" ({getattr(settings, limit)}, from {resolved.sources.get(limit, 'the default')})" if limit else ""
        _say(ctx, f"nothing to do: the run at step {trainer.step} already {STOP_MESSAGES.get(reason, reason)}"
                  f"{value}; raise it to train on")
        return log
    log_path, curve_path = write_log(log, a.out, title=f"aiayn train ({described})")
    best = log.get("best") or {}
    _say(ctx, f"stopped at step {trainer.step} (epoch {epochs_done(trainer):.2f}, "
              f"{format_duration(log.get('elapsed', 0.0))} of training): {STOP_MESSAGES.get(reason, reason)}"
              + (f"; best dev {best['metric']} {best['score']:.4g} at step {best['step']} ({BEST})"
                 if best.get("score") is not None else ""))
    _say(ctx, f"wrote {model_path(a.out, trainer.step)}, {log_path}, {curve_path}")
    return log
