"""`aiayn train`: parallel text files in, a shared sentencepiece vocabulary, the Transformer trained
with the paper's recipe (§5), dev-set loss and BLEU, checkpoints, log and loss curve out. Runs
unchanged under `torchrun --nproc_per_node N`."""

import json
import os
import sys
from dataclasses import dataclass

import torch

from aiayn.data import Vocabulary, corpus_bleu, read_parallel
from aiayn.errors import UserInputError
from aiayn.train.checkpoint import check_config, checkpoint_steps, load_model, load_state, model_path, state_path
from aiayn.train.distributed import barrier, init_distributed
from aiayn.train.loop import fit, new_log, write_log
from aiayn.train.trainer import Trainer, TrainOptions

VOCAB_NAME = "vocab.model"


@dataclass
class RunArgs:
    src: str
    tgt: str
    valid_src: str
    valid_tgt: str
    out: str
    config: str = "base"
    steps: int = 100_000
    options: TrainOptions = None
    vocab_size: int = 8000
    vocab_type: str = "bpe"
    vocab: str = None                # an existing sentencepiece model instead of learning one
    resume: bool = False
    save_every: int = 1000
    keep_last: int = 0
    valid_every: int = 1000
    bleu_sentences: int = 500        # dev sentences decoded for BLEU (0 = none)
    beam: int = 4
    alpha: float = 0.6
    device: str = None
    dropout: float = None            # overrides the preset's P_drop
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


def translate_ids(model, src_ids, *, beam, alpha, device, batch_sentences=64, max_len_offset=50):
    """Beam-search translations (token ids) of token-id sentences, batched by length, in input order."""
    from aiayn.train.batching import collate

    cfg = model.config
    model.eval()
    order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]))
    out = [None] * len(src_ids)
    with torch.no_grad():
        for start in range(0, len(order), batch_sentences):
            chunk = order[start:start + batch_sentences]
            src, _, _ = collate([(src_ids[i], []) for i in chunk], cfg.pad_id, cfg.bos_id, cfg.eos_id, device)
            hyps = model.generate(src, beam_size=beam, length_penalty=alpha, max_len_offset=max_len_offset)
            for i, h in zip(chunk, hyps):
                out[i] = list(h)
    return out


def run_training(a):
    """Trains per `a` (RunArgs); returns the final log."""
    from aiayn.nn import Transformer, TransformerConfig

    device_type = pick_device(a.device).type
    ctx = init_distributed(device_type)
    device = pick_device(a.device, ctx.local_rank)
    if a.config not in ("base", "big", "tiny"):
        raise UserInputError(f"--config must be base, big or tiny, not {a.config!r}")
    src_lines, tgt_lines = read_parallel(a.src, a.tgt)
    valid_src, valid_tgt = read_parallel(a.valid_src, a.valid_tgt)
    os.makedirs(a.out, exist_ok=True)
    steps_done = checkpoint_steps(a.out)
    if steps_done and not a.resume:
        raise UserInputError(f"{a.out!r} already holds checkpoints (up to step {steps_done[-1]}); pass --resume "
                             "to continue that run, or choose another --out")

    vocab_path = os.path.join(a.out, VOCAB_NAME)
    if not os.path.isfile(vocab_path):
        if ctx.is_main:
            if a.vocab:
                import shutil

                Vocabulary(a.vocab)  # validates it
                shutil.copyfile(a.vocab, vocab_path)
            else:
                _say(ctx, f"learning a shared {a.vocab_type} vocabulary of up to {a.vocab_size} pieces ...")
                Vocabulary.train([a.src, a.tgt], vocab_path[:-len(".model")], a.vocab_size, a.vocab_type)
        barrier(ctx)
    vocab = Vocabulary(vocab_path)

    overrides = {} if a.dropout is None else {"dropout": a.dropout}
    config = TransformerConfig.preset(a.config, len(vocab), len(vocab), share_embeddings=True, **overrides)
    pairs, dropped = encode_pairs(vocab, src_lines, tgt_lines, config.max_len)
    if not pairs:
        raise UserInputError(f"no training pair is shorter than the model's max_len ({config.max_len} tokens)")
    if dropped:
        _say(ctx, f"dropped {dropped} training pairs longer than {config.max_len - 1} tokens")
    valid_pairs, _ = encode_pairs(vocab, valid_src, valid_tgt, config.max_len)

    options = a.options or TrainOptions()
    log = new_log()
    state = None
    if a.resume and steps_done:
        step = steps_done[-1]
        model = load_model(model_path(a.out, step))
        check_config(model, config, model_path(a.out, step))
        state = load_state(state_path(a.out, step))
        if state.get("step") != step:
            raise UserInputError(f"training state {state_path(a.out, step)!r} belongs to step {state.get('step')}, "
                                 f"not {step}")
        options = TrainOptions(**state["options"])
        log = state.get("log", log)
        _say(ctx, f"resuming from step {step} (training options of that run: {options.to_dict()})")
    else:
        torch.manual_seed(options.seed)
        model = Transformer(config)
        if ctx.is_main:
            with open(os.path.join(a.out, "run.json"), "w") as f:
                json.dump({"config": config.to_dict(), "options": options.to_dict(), "vocab": VOCAB_NAME,
                           "train": [a.src, a.tgt], "valid": [a.valid_src, a.valid_tgt]}, f, indent=1)
    trainer = Trainer(model, pairs, options, device, ctx)
    if state is not None:
        trainer.load_state_dict(state)
    _say(ctx, f"{len(pairs)} training pairs, {len(valid_pairs)} dev pairs, vocabulary {len(vocab)}, "
              f"config {a.config}, {sum(p.numel() for p in model.parameters())} parameters, {ctx.world_size} rank(s), {device}")

    def validate():
        if not ctx.is_main:
            return {}
        loss, nll = trainer.evaluate(valid_pairs)
        result = {"loss": loss, "nll": nll}
        if a.bleu_sentences:
            subset = valid_pairs[:a.bleu_sentences]
            hyps = translate_ids(model, [s for s, _ in subset], beam=a.beam, alpha=a.alpha, device=device)
            result["bleu"] = corpus_bleu([vocab.decode(h) for h in hyps], valid_tgt[:len(subset)])
        return result

    log = fit(trainer, a.steps, log=log, out_dir=a.out, save_every=a.save_every, keep_last=a.keep_last,
              validate=validate, valid_every=a.valid_every, progress=a.progress)
    if ctx.is_main:
        log_path, curve_path = write_log(log, a.out, title=f"aiayn train --config {a.config}")
        _say(ctx, f"wrote {model_path(a.out, trainer.step)}, {log_path}, {curve_path}")
    return log
