"""`aiayn train` for real corpora and `aiayn evaluate`: model shape from flags and config files
(JSON, TOML; preset < file < flags), stops by time / epochs / early stopping that --resume continues
exactly, validation lines and log fields, the best checkpoint, which model a run directory stands for,
BLEU / chrF with signatures, every bad input's one-line error, and a smoke run on a Multi30k slice."""

import json
import os
import random
import re

import pytest
import torch

from aiayn.cli import main
from aiayn.data import Vocabulary
from aiayn.errors import UserInputError
from aiayn.nn import Transformer, TransformerConfig
from aiayn.nn.config import PRESETS
from aiayn.train import loop
from aiayn.train.checkpoint import checkpoint_steps, load_model, model_path, resolve_model_file
from aiayn.train.config_file import read_config_file, resolve
from aiayn.train.loop import BestTracker, fit, format_valid
from aiayn.train.trainer import Trainer, TrainOptions

WORDS = "the a small big red blue cat dog house tree sees likes runs sleeps near under".split()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI30K = os.path.join(REPO, "..", "shared", "data", "multi30k")
TINY = ["--config", "tiny", "--layers", "1", "--d-model", "32", "--d-ff", "64", "--heads", "2"]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A toy parallel corpus (the target is the source reversed) and one vocabulary for every run."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    src = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(240)]
    tgt = [" ".join(s.split()[::-1]) for s in src]
    files = {"src": write_lines(d / "train.src", src[:200]), "tgt": write_lines(d / "train.tgt", tgt[:200]),
             "valid_src": write_lines(d / "valid.src", src[200:]), "valid_tgt": write_lines(d / "valid.tgt", tgt[200:])}
    Vocabulary.train([files["src"], files["tgt"]], str(d / "vocab"), 60, "bpe")
    return {**files, "vocab": str(d / "vocab.model"), "dir": d}


def train_args(corpus, out, *extra, model=TINY):
    return ["train", "--src", corpus["src"], "--tgt", corpus["tgt"], "--valid-src", corpus["valid_src"],
            "--valid-tgt", corpus["valid_tgt"], *model, "--out", str(out), "--vocab", corpus["vocab"],
            "--max-tokens", "400", "--warmup", "4", "--save-every", "100", "--valid-every", "100",
            "--bleu-sentences", "4", "--beam", "1", "--no-progress", "--device", "cpu", *extra]


def read_log(out):
    with open(os.path.join(out, "log.json")) as f:
        return json.load(f)


def error_of(capsys, argv):
    """Runs the command line; it must fail with status 2 and one line on stderr, which is returned."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def snapshot(directory):
    """(name, size, mtime) of every file: to check that a failed command changed nothing."""
    if not os.path.isdir(directory):
        return None
    return sorted((n, os.path.getsize(os.path.join(directory, n)), os.path.getmtime(os.path.join(directory, n)))
                  for n in os.listdir(directory))


@pytest.fixture
def fake_clock(monkeypatch):
    """Training time without waiting: every optimizer step takes 10 seconds of a fake clock."""
    clock = {"t": 1000.0}
    monkeypatch.setattr(loop, "_clock", lambda: clock["t"])
    original = Trainer.train_step

    def step(self):
        clock["t"] += 10.0
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", step)
    return clock


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(train_args(corpus, out, "--steps", "4", "--save-every", "2", "--valid-every", "2")) == 0
    return out


# -- presets and config files --------------------------------------------------------------------

def test_small_preset():
    assert PRESETS["small"] == dict(num_layers=3, d_model=256, d_ff=1024, num_heads=4, dropout=0.1, label_smoothing=0.1)
    cfg = TransformerConfig.preset("small", 8000)
    assert (cfg.num_layers, cfg.d_model, cfg.d_k) == (3, 256, 64)


def test_config_file_json_and_toml_precedence(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\n[model]\nd_ff = 96\ndropout = 0.2\nnorm_first = true\n'
                    '[train]\nwarmup = 50\nmax_time = 1.5\nmax_tokens = 900\n')
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"preset": "tiny", "model": {"d_ff": 96, "dropout": 0.2, "norm_first": True},
                              "train": {"warmup": 50, "max_time": 1.5, "max_tokens": 900}}))
    assert read_config_file(str(toml)) == read_config_file(str(js))
    for path in (toml, js):
        r = resolve(str(path), model_flags={"dropout": 0.3}, train_flags={"max_tokens": 700})
        # preset < file < flags
        assert r.preset == "tiny" and r.model["d_model"] == PRESETS["tiny"]["d_model"]
        assert r.model["d_ff"] == 96 and r.model["norm_first"] is True and r.model["dropout"] == 0.3
        assert r.settings.warmup == 50 and r.settings.max_time == 1.5 and r.settings.max_tokens == 700
        assert r.settings.steps == 100_000  # untouched: the default
        assert r.sources["dropout"] == "--dropout" and "run." in r.sources["d_ff"]
        # --preset beats the file's preset; the file's fields still apply over it
        r = resolve(str(path), preset="small")
        assert r.preset == "small" and r.model["d_model"] == 256 and r.model["d_ff"] == 96
    assert resolve("small").model["num_layers"] == 3 and resolve(None).preset == "base"
    # on --resume without a preset, the run's own config is the base
    run = TransformerConfig.preset("tiny", 50, d_ff=80).to_dict()
    assert resolve(None, model_flags={"dropout": 0.0}, run_config=run).model["d_ff"] == 80


def test_config_file_through_the_command_line(corpus, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "tiny"\n[model]\nnum_layers = 1\nd_model = 32\nd_ff = 48\nnum_heads = 2\n'
                   'attention_dropout = 0.05\n[train]\nsteps = 2\nwarmup = 3\nclip_norm = 0.5\n')
    out = tmp_path / "run"
    assert main(train_args(corpus, out, "--config", str(cfg), "--d-ff", "40", "--ffn-dropout", "0.1",
                           "--label-smoothing", "0.2", "--no-share-embeddings", "--max-len", "40", model=[])) == 0
    info = json.load(open(out / "run.json"))
    c = info["config"]
    assert (c["num_layers"], c["d_model"], c["d_ff"], c["num_heads"]) == (1, 32, 40, 2)
    assert (c["attention_dropout"], c["ffn_dropout"], c["label_smoothing"]) == (0.05, 0.1, 0.2)
    assert c["share_embeddings"] is False and c["max_len"] == 40
    # the file's options, where no flag overrides them (train_args passes --warmup 4)
    assert info["options"]["clip_norm"] == 0.5 and info["options"]["warmup"] == 4
    assert info["config_file"] == str(cfg) and info["settings"]["steps"] == 2
    assert checkpoint_steps(str(out)) == [2] and load_model(model_path(str(out), 2)).config.d_ff == 40
    capsys.readouterr()


@pytest.mark.parametrize("name,text,message", [
    ("bad.json", '{"preset": "tiny",\n "model": {"d_ff": 4,}\n}', r"bad\.json.*not valid JSON: line 2"),
    ("bad.toml", 'preset = "tiny"\n[model]\nd_ff = = 3\n', r"bad\.toml.*not valid TOML.*line 3"),
    ("c.json", '{"presets": "tiny"}', r"unknown key\(s\) presets"),
    ("c.json", '{"model": {"d_modle": 8, "headz": 2}}', r"unknown model field\(s\) d_modle, headz"),
    ("c.json", '{"train": {"max_tokenz": 8}}', r"unknown train field\(s\) max_tokenz"),
    ("c.json", '{"model": {"src_vocab_size": 8}}', r"src_vocab_size comes from the vocabulary"),
    ("c.toml", '[model]\ndropout = "0.1"\n', r"model\.dropout must be a number"),
    ("c.toml", '[train]\nsteps = 2.5\n', r"train\.steps must be an integer"),
    ("c.toml", '[train]\nmax_time = 0\n', r"train\.max_time must be > 0"),
    ("c.toml", '[train]\nmax_epochs = 0\n', r"train\.max_epochs must be an integer >= 1"),
    ("c.toml", 'preset = "huge"\n', r"unknown preset 'huge'"),
    ("c.yaml", 'preset: tiny\n', r"must end in \.json or \.toml"),
    ("c.toml", '[model]\nd_model = 30\nnum_heads = 4\n', r"'d_model' \(30\) must be divisible by 'num_heads'.*d_model from config file"),
    ("c.toml", '[model]\nd_ff = -5\n', r"'d_ff' must be a positive int.*d_ff from config file"),
    ("c.toml", '[model]\ndropout = 1.5\n', r"'dropout' must be in \[0, 1\).*dropout from config file"),
])
def test_config_file_errors(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserInputError, match=message):
        resolve(str(path)).transformer_config(64)


def test_bad_train_inputs_one_line_nothing_written(corpus, trained, tmp_path, capsys):
    out = tmp_path / "never"
    cases = [
        (["--config", str(tmp_path / "missing.toml")], "does not exist"),
        (["--config", "huge"], "neither a preset"),
        (["--max-time", "0"], "--max-time must be > 0"),
        (["--max-time", "-3"], "--max-time must be > 0"),
        (["--max-epochs", "0"], "--max-epochs must be an integer >= 1"),
        (["--early-stop", "0"], "--early-stop must be an integer >= 1"),
        (["--steps", "0"], "--steps must be an integer >= 1"),
        (["--heads", "3"], r"'d_model' \(32\) must be divisible by 'num_heads' \(3\).*num_heads from --heads"),
        (["--d-ff", "-1"], r"'d_ff' must be a positive int.*from --d-ff"),
        (["--dropout", "1.0"], r"'dropout' must be in \[0, 1\).*from --dropout"),
    ]
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {\n"d_ff": 64\n')
    cases.append((["--config", str(bad)], r"bad\.json.* line 3"))
    for extra, message in cases:
        assert re.search(message, error_of(capsys, train_args(corpus, out, "--steps", "1", *extra))), extra
        assert not os.path.exists(out), extra
    # resuming with model flags other than the run's names the fields; the run is untouched
    before = snapshot(trained)
    err = error_of(capsys, train_args(corpus, trained, "--steps", "6", "--resume", "--d-model", "64", "--d-ff", "80"))
    assert "another config" in err and "d_model: the run has 32, asked for 64 (from --d-model)" in err
    assert "d_ff: the run has 64, asked for 80" in err
    assert snapshot(trained) == before


def test_train_help_documents_limits_and_files(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--max-time MINUTES", "summed over --resume", "--max-epochs", "--early-stop PATIENCE",
                   "--valid-every-epoch", "--no-share-embeddings", "best.safetensors", ".toml"):
        assert needle in text, needle
    for command in ("translate", "evaluate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "averaged.safetensors if present" in text and "else its best.safetensors" in text


# -- stops and exact resume ----------------------------------------------------------------------

def test_max_time_stops_and_resume_is_exact(corpus, tmp_path, fake_clock, capsys):
    straight = tmp_path / "straight"
    assert main(train_args(corpus, straight, "--steps", "6")) == 0
    expected = read_log(straight)
    capsys.readouterr()

    split = tmp_path / "split"
    # 30 s of a budget of 10 s per step: stops cleanly after step 3, with a checkpoint
    assert main(train_args(corpus, split, "--steps", "6", "--max-time", "0.5")) == 0
    assert "reached --max-time" in capsys.readouterr().err
    assert checkpoint_steps(str(split)) == [3]
    log = read_log(split)
    assert log["stopped"] == "max_time" and log["elapsed"] == pytest.approx(30.0)
    # the elapsed time is the total: a larger --max-time continues, resumed files come from run.json
    assert main(["train", "--out", str(split), "--resume", "--max-time", "0.75", "--steps", "6", "--no-progress",
                 "--device", "cpu"]) == 0
    log = read_log(split)
    assert checkpoint_steps(str(split)) == [3, 5] and log["elapsed"] == pytest.approx(50.0)
    assert [e["seconds"] for e in log["train"]] == pytest.approx([10, 20, 30, 40, 50])
    # the same --max-time again: nothing to do, nothing written
    before = snapshot(split)
    assert main(train_args(corpus, split, "--steps", "6", "--max-time", "0.75", "--resume")) == 0
    assert "nothing to do" in capsys.readouterr().err and snapshot(split) == before
    # the run keeps its --max-time (run.json) unless a flag raises it
    assert main(train_args(corpus, split, "--steps", "6", "--resume")) == 0
    assert "already reached --max-time (0.75, from the resumed run)" in capsys.readouterr().err
    assert main(train_args(corpus, split, "--steps", "6", "--resume", "--max-time", "5")) == 0
    log = read_log(split)
    assert [e["loss"] for e in log["train"]] == [e["loss"] for e in expected["train"]]
    a, b = load_model(model_path(str(straight), 6)), load_model(model_path(str(split), 6))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_max_time_real_clock(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(corpus, out, "--steps", "100000", "--max-time", "0.001")) == 0
    steps = checkpoint_steps(str(out))
    assert len(steps) == 1 and steps[0] < 100000 and read_log(out)["stopped"] == "max_time"
    capsys.readouterr()


def test_max_epochs_and_epoch_validation(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(corpus, out, "--max-epochs", "1", "--valid-every", "0", "--valid-every-epoch")) == 0
    log = read_log(out)
    assert log["stopped"] == "max_epochs" and [e["epoch"] for e in log["valid"]] == [1.0]
    one_epoch = log["valid"][0]["step"]
    assert main(train_args(corpus, out, "--max-epochs", "2", "--valid-every", "0", "--valid-every-epoch",
                           "--resume")) == 0
    log = read_log(out)
    assert [e["epoch"] for e in log["valid"]] == [1.0, 2.0]
    assert log["valid"][0]["step"] == one_epoch and log["valid"][-1]["step"] == len(log["train"])
    err = capsys.readouterr().err
    assert "reached --max-epochs" in err


def test_validation_lines_log_fields_and_curves(trained, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(corpus, out, "--steps", "4", "--valid-every", "2")) == 0
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("valid ")]
    assert len(lines) == 2
    assert re.fullmatch(r"valid step=2 epoch=\d\.\d\d elapsed=\d+m\d\ds tok/s=\d+ loss=\d+\.\d{4} ppl=\d+\.\d\d "
                        r"bleu=\d+\.\d\d( \(new best\))?", lines[0]), lines[0]
    log = read_log(out)
    for entry in log["valid"]:
        assert {"step", "epoch", "elapsed", "tokens_per_s", "loss", "nll", "ppl", "bleu", "best"} <= set(entry)
    for name in ("loss_curve.png", "bleu_curve.png", "best.safetensors", "best.json"):
        assert os.path.getsize(out / name) > 100, name


# -- the best checkpoint and early stopping ------------------------------------------------------

def test_best_tracker_selection():
    t = BestTracker()
    picks = [t.update({"step": s, "loss": 9.0, "bleu": b}) for s, b in [(1, 10.0), (2, 12.0), (3, 11.0), (4, 12.0),
                                                                          (5, 13.0)]]
    assert picks == [True, True, False, False, True]  # a tie is no improvement
    assert (t.metric, t.score, t.step, t.bad) == ("bleu", 13.0, 5, 0)
    t.update({"step": 6, "loss": 1.0, "bleu": 1.0})
    t.update({"step": 7, "loss": 1.0, "bleu": 2.0})
    assert t.bad == 2 and BestTracker(t.state_dict()).state_dict() == t.state_dict()
    # without BLEU: dev loss, lower is better
    t = BestTracker()
    assert [t.update({"step": s, "loss": v}) for s, v in [(1, 5.0), (2, 4.0), (3, 4.5), (4, 3.0)]] == \
        [True, True, False, True]
    assert (t.metric, t.score, t.step) == ("loss", 3.0, 4)
    assert format_valid({"step": 3, "epoch": 0.5, "elapsed": 75.0, "tokens_per_s": 1234.4, "loss": 2.0,
                         "ppl": 5.5, "bleu": 12.345, "best": True}) == \
        "valid step=3 epoch=0.50 elapsed=1m15s tok/s=1234 loss=2.0000 ppl=5.50 bleu=12.35 (new best)"


def _tiny_trainer():
    from aiayn.data import synthetic_pairs

    torch.manual_seed(0)
    cfg = TransformerConfig.preset("tiny", 13, 13, num_layers=1, d_model=32, d_ff=64, num_heads=2, max_len=64)
    return Trainer(Transformer(cfg), synthetic_pairs("copy", 64, max_len=8, seed=1), TrainOptions(max_tokens=300,
                                                                                                     warmup=5))


def test_best_checkpoint_and_early_stop_with_scripted_scores(tmp_path, capsys):
    scores = iter([5.0, 7.0, 6.0, 7.0, 9.0])
    trainer = _tiny_trainer()
    log = fit(trainer, 20, out_dir=str(tmp_path), save_every=1, validate=lambda: {"loss": 1.0, "bleu": next(scores)},
              valid_every=1, early_stop=2, progress=False)
    # best at step 2 (7.0); steps 3 and 4 bring none better: stop after step 4, with a checkpoint
    assert log["stopped"] == "early_stop" and trainer.step == 4 and checkpoint_steps(str(tmp_path))[-1] == 4
    best = json.load(open(tmp_path / "best.json"))
    assert (best["step"], best["score"], best["metric"]) == (2, 7.0, "bleu")
    a = load_model(str(tmp_path / "best.safetensors")).state_dict()
    b = load_model(model_path(str(tmp_path), 2)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log["best"]["bad"] == 2 and [e["best"] for e in log["valid"]] == [True, True, False, False]
    assert "early-stop" in loop.STOP_MESSAGES["early_stop"] and resolve_model_file(str(tmp_path)).endswith("best.safetensors")


def test_log_json_is_written_at_every_validation(tmp_path):
    # a long run's progress is readable while it trains: at each validation, log.json on disk holds
    # every earlier validation (plots still come at the end, from write_log)
    seen = []

    def validate():
        path = tmp_path / "log.json"
        seen.append(len(json.load(open(path))["valid"]) if path.exists() else None)
        return {"loss": 1.0, "bleu": 3.0 + len(seen)}

    log = fit(_tiny_trainer(), 3, out_dir=str(tmp_path), validate=validate, valid_every=1, progress=False)
    assert seen == [None, 1, 2]
    on_disk = json.load(open(tmp_path / "log.json"))
    assert [e["bleu"] for e in on_disk["valid"]] == [e["bleu"] for e in log["valid"]] == [4.0, 5.0, 6.0]
    assert on_disk["elapsed"] > 0 and not (tmp_path / "loss_curve.png").exists()


def test_early_stop_through_the_command_line(corpus, tmp_path, capsys, monkeypatch):
    # the dev loss never improves after the first validation (a fake evaluate), so patience 2 stops at step 3
    monkeypatch.setattr(Trainer, "evaluate", lambda self, pairs, max_tokens=None: (2.0, 1.5))
    out = tmp_path / "run"
    assert main(train_args(corpus, out, "--steps", "50", "--valid-every", "1", "--bleu-sentences", "0",
                           "--early-stop", "2")) == 0
    log = read_log(out)
    assert log["stopped"] == "early_stop" and checkpoint_steps(str(out)) == [3]
    assert json.load(open(out / "best.json"))["step"] == 1
    assert "no new best" in capsys.readouterr().err


def test_run_directory_model_order(tmp_path):
    for name in ("checkpoint_00000002.safetensors", "checkpoint_00000010.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    assert resolve_model_file(str(tmp_path)).endswith("checkpoint_00000010.safetensors")
    (tmp_path / "best.safetensors").write_bytes(b"x")
    assert resolve_model_file(str(tmp_path)).endswith("best.safetensors")
    (tmp_path / "averaged.safetensors").write_bytes(b"x")
    assert resolve_model_file(str(tmp_path)).endswith("averaged.safetensors")
    os.mkdir(tmp_path / "empty")
    with pytest.raises(UserInputError, match="holds no averaged.safetensors, best.safetensors or checkpoint"):
        resolve_model_file(str(tmp_path / "empty"))


# -- evaluate ------------------------------------------------------------------------------------

def test_evaluate_scores_with_signatures_in_input_order(trained, corpus, tmp_path, capsys):
    src = open(corpus["valid_src"]).read().splitlines()[:12]
    ref = open(corpus["valid_tgt"]).read().splitlines()[:12]
    hyp = tmp_path / "hyp.txt"
    args = ["evaluate", "--checkpoint", str(trained), "--beam", "2", "--device", "cpu"]
    assert main([*args, "--src", write_lines(tmp_path / "s", src), "--ref", write_lines(tmp_path / "r", ref),
                 "--output", str(hyp)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert re.match(r"BLEU = \d+\.\d+ .*signature: nrefs:1\|case:mixed\|eff:no\|tok:13a\|smooth:exp\|version:", lines[0])
    assert re.match(r"chrF2 = \d+\.\d+ .*signature: nrefs:1\|case:mixed\|.*version:", lines[1])
    forward = hyp.read_text().splitlines()
    assert len(forward) == len(src)
    # the same sentences reversed (one batch either way): the translations come back reversed
    assert main([*args, "--src", write_lines(tmp_path / "s2", src[::-1]), "--ref", write_lines(tmp_path / "r2", ref[::-1]),
                 "--output", str(hyp), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert hyp.read_text().splitlines() == forward[::-1]
    assert result["sentences"] == 12 and result["bleu_signature"].startswith("nrefs:1")
    assert 0 <= result["chrf"] <= 100 and result["checkpoint"].endswith(".safetensors")


def test_evaluate_quantized(trained, corpus, tmp_path, capsys):
    """--quantize scores the model as `aiayn translate --quantize` runs it: the same translations."""
    src = write_lines(tmp_path / "s", open(corpus["valid_src"]).read().splitlines()[:8])
    ref = write_lines(tmp_path / "r", open(corpus["valid_tgt"]).read().splitlines()[:8])
    for mode in ("bf16", "int8"):
        hyp, out = tmp_path / f"hyp_{mode}.txt", tmp_path / f"out_{mode}.txt"
        assert main(["evaluate", "--checkpoint", str(trained), "--src", src, "--ref", ref, "--beam", "2",
                     "--quantize", mode, "--output", str(hyp), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["precision"] == mode and result["sentences"] == 8
        assert main(["translate", "--checkpoint", str(trained), "--input", src, "--output", str(out), "--beam", "2",
                     "--quantize", mode, "-q"]) == 0
        assert hyp.read_text() == out.read_text()


def test_evaluate_bad_inputs(trained, corpus, tmp_path, capsys):
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("keep me\n")
    short = write_lines(tmp_path / "short", ["the cat"] * 3)
    base = ["evaluate", "--checkpoint", str(trained), "--output", str(hyp)]
    assert "has 40 lines but reference file" in error_of(capsys, [*base, "--src", corpus["valid_src"], "--ref", short])
    assert "does not exist" in error_of(capsys, [*base, "--src", str(tmp_path / "nope"), "--ref", short])
    assert "does not exist" in error_of(capsys, ["evaluate", "--checkpoint", str(tmp_path / "norun"), "--src", short,
                                                 "--ref", short])
    assert hyp.read_text() == "keep me\n"


# -- real data -----------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.isdir(MULTI30K), reason="no Multi30k copy at ../shared/data/multi30k")
def test_multi30k_slice_smoke(tmp_path, capsys):
    def head(name, n):
        with open(os.path.join(MULTI30K, name), encoding="utf-8") as f:
            return write_lines(tmp_path / name, [next(f).rstrip("\n") for _ in range(n)])

    src, tgt, vsrc, vtgt = head("train.de", 300), head("train.en", 300), head("val.de", 20), head("val.en", 20)
    out = tmp_path / "run"
    assert main(["train", "--src", src, "--tgt", tgt, "--valid-src", vsrc, "--valid-tgt", vtgt, "--out", str(out),
                 "--preset", "small", "--layers", "1", "--d-model", "64", "--d-ff", "128", "--vocab-size", "400",
                 "--max-tokens", "800", "--warmup", "4", "--steps", "3", "--valid-every", "3", "--bleu-sentences", "5",
                 "--beam", "1", "--no-progress", "--device", "cpu"]) == 0
    log = read_log(out)
    assert len(log["train"]) == 3 and log["valid"][-1]["bleu"] >= 0 and os.path.exists(out / "best.safetensors")
    assert main(["evaluate", "--checkpoint", str(out), "--src", vsrc, "--ref", vtgt, "--beam", "1",
                 "--output", str(tmp_path / "hyp.en")]) == 0
    assert capsys.readouterr().out.startswith("BLEU = ")
    assert len((tmp_path / "hyp.en").read_text().splitlines()) == 20
