"""Dev BLEU against training time for the nn.Transformer baseline of issue 21: the same model as an
aiayn run (its config and vocabulary) built from nn.Transformer + nn.Embedding + the tied projection
(aiayn/bench/cases.py: _torch_transformer_model), trained by the same Trainer on the same batches
with torch's unfused loss, snapshots every --every minutes of training time; then each snapshot is
decoded with aiayn's beam search (beam 4, alpha 0.6; the decoder re-run on the whole prefix, as an
nn.Transformer user does, since nn.Transformer has no cache) and scored with sacrebleu like
`aiayn evaluate`. Training time excludes the snapshot saves and all decoding, as in `aiayn train`.

    python scripts/baseline_bleu_curve.py --run m30k/ --src train.de --tgt train.en \
        --valid-src val.de --valid-tgt val.en --minutes 30 --every 7.5 --out baseline/

Writes OUT/curve.json ([{"minutes", "step", "bleu", "chrf"}]) and, with --aiayn-log RUN/log.json,
OUT/bleu_vs_time.png: the curves on one plot (aiayn's from its logs' validations, --aiayn-log
[LABEL=]PATH as often as needed, plus --aiayn-point MINUTES:BLEU[:LABEL] points such as the
averaged checkpoint's score; points sharing a LABEL make one line).
"""

import argparse
import json
import math
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aiayn import decoding  # noqa: E402
from aiayn.bench.cases import _torch_transformer_model  # noqa: E402
from aiayn.data import Vocabulary, read_parallel  # noqa: E402
from aiayn.nn import TransformerConfig  # noqa: E402
from aiayn.train.run import _valid_set, encode_pairs  # noqa: E402
from aiayn.train.trainer import Trainer, TrainOptions  # noqa: E402
from aiayn.translate import translate_ids  # noqa: E402


class BaselineForDecoding(torch.nn.Module):
    """The baseline model behind the interface aiayn's beam search uses (encode / decode /
    generate without a cache)."""

    def __init__(self, model, config):
        super().__init__()
        self.inner, self.config = model, config

    def _padding_mask(self, src, mask):
        return src == self.config.pad_id if mask is None else mask

    def _emb(self, t):
        m = self.inner
        return m.embed(t) * math.sqrt(self.config.d_model) + m.pe(t.shape[1])

    def encode(self, src, mask):
        return self.inner.core.encoder(self._emb(src), src_key_padding_mask=mask)

    def decode(self, tgt, memory, mask, tgt_key_padding_mask=None, cache=None, start=0):
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device)
        out = self.inner.core.decoder(self._emb(tgt), memory, tgt_mask=causal, tgt_is_causal=True,
                                      tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=mask)
        return self.inner.generator(out)

    def generate(self, src, mask, beam_size=4, length_penalty=0.6, max_len_offset=50):
        return decoding.generate(self, src, mask, beam_size, length_penalty, max_len_offset, use_cache=False)


def score(model, config, vocab, valid_pairs, refs, beam, alpha):
    import sacrebleu

    wrapped = BaselineForDecoding(model, config).eval()  # no dropout while decoding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hyps = translate_ids(wrapped, [s for s, _ in valid_pairs], beam=beam, alpha=alpha, batch_size=32)
    text = [vocab.decode(h) for h in hyps]
    return (sacrebleu.corpus_bleu(text, [refs]).score, sacrebleu.corpus_chrf(text, [refs]).score)


def plot(curve, aiayn_logs, points, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec in aiayn_logs:
        label, _, log_path = spec.rpartition("=")
        with open(log_path) as f:
            log = json.load(f)
        valid = [e for e in log.get("valid", []) if e.get("bleu") is not None]
        ax.plot([e["elapsed"] / 60 for e in valid], [e["bleu"] for e in valid], "o-",
                label=f"aiayn{' ' + label if label else ''} (dev BLEU)")
    series = {}
    for minutes, bleu, label in points:  # points sharing a label are one series
        series.setdefault(label, []).append((minutes, bleu))
    for label, xy in series.items():
        xy.sort()
        ax.plot([x for x, _ in xy], [y for _, y in xy], "*-" if len(xy) > 1 else "*", ms=13 if len(xy) == 1 else 9,
                label=label)
    ax.plot([c["minutes"] for c in curve], [c["bleu"] for c in curve], "s-", label="nn.Transformer, same Trainer")
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("val BLEU (beam 4)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="an aiayn run directory (its run.json config and vocab.model)")
    p.add_argument("--src", required=True)
    p.add_argument("--tgt", required=True)
    p.add_argument("--valid-src", required=True)
    p.add_argument("--valid-tgt", required=True)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--every", type=float, default=7.5, help="minutes of training between snapshots")
    p.add_argument("--out", required=True)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--aiayn-log", action="append", default=[],
                   help="[LABEL=]an aiayn run's log.json, plotted beside the baseline (repeatable)")
    p.add_argument("--aiayn-point", action="append", default=[], help="MINUTES:BLEU[:LABEL], e.g. averaged")
    p.add_argument("--score-only", action="store_true", help="score the snapshots in --out again")
    p.add_argument("--plot-only", action="store_true", help="plot OUT/curve.json again (no training, no scoring)")
    a = p.parse_args()
    with open(os.path.join(a.run, "run.json")) as f:
        info = json.load(f)
    config = TransformerConfig(**info["config"])
    options = TrainOptions(**info["options"])
    vocab = Vocabulary(os.path.join(a.run, "vocab.model"))
    src, tgt = read_parallel(a.src, a.tgt)
    pairs, _ = encode_pairs(vocab, src, tgt, config.max_len)
    vs, vt = read_parallel(a.valid_src, a.valid_tgt)
    valid_pairs, refs = _valid_set(vocab, vs, vt, config.max_len)
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(options.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _torch_transformer_model(config, "cpu")
    model.config = config
    if not (a.score_only or a.plot_only):
        trainer = Trainer(model, pairs, options, "cpu", fused_loss=False)
        trained, next_snap = 0.0, a.every * 60
        while trained < a.minutes * 60 - 1e-9:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.train_step()
            trained += time.perf_counter() - start
            if trained >= next_snap or trained >= a.minutes * 60:
                path = os.path.join(a.out, f"snapshot_{trainer.step:06d}.pt")
                torch.save({"state": model.state_dict(), "step": trainer.step, "minutes": trained / 60}, path)
                print(f"snapshot step {trainer.step} at {trained / 60:.2f} min of training", flush=True)
                next_snap += a.every * 60
    points = []
    for spec in a.aiayn_point:
        parts = spec.split(":")
        points.append((float(parts[0]), float(parts[1]), parts[2] if len(parts) > 2 else "aiayn"))
    if a.plot_only:
        with open(os.path.join(a.out, "curve.json")) as f:
            plot(json.load(f), a.aiayn_log, points, os.path.join(a.out, "bleu_vs_time.png"))
        return
    snapshots = sorted(f for f in os.listdir(a.out) if f.startswith("snapshot_"))
    curve = []
    for name in snapshots:
        snap = torch.load(os.path.join(a.out, name))
        model.load_state_dict(snap["state"])
        bleu, chrf = score(model, config, vocab, valid_pairs, refs, a.beam, a.alpha)
        curve.append({"minutes": snap["minutes"], "step": snap["step"], "bleu": bleu, "chrf": chrf})
        print(f"step {snap['step']} ({snap['minutes']:.2f} min): BLEU {bleu:.2f} chrF {chrf:.2f}", flush=True)
    with open(os.path.join(a.out, "curve.json"), "w") as f:
        json.dump(curve, f, indent=1)
    plot(curve, a.aiayn_log, points, os.path.join(a.out, "bleu_vs_time.png"))
    print(f"wrote {os.path.join(a.out, 'curve.json')}, {os.path.join(a.out, 'bleu_vs_time.png')}")


if __name__ == "__main__":
    main()
