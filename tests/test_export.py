"""`aiayn export --format ctranslate2` (issue 22): the exported model computes aiayn's log-probabilities,
greedy search gives aiayn's tokens exactly and beam search mostly the same; exporting leaves the
model untouched; every bad input is one line and exit status 2 with nothing written. Tests that run
CTranslate2 skip where it is not installed; the bad-input tests run everywhere."""

import json
import os
import random

import pytest
import torch
import torch.nn.functional as F

from aiayn.cli import main
from aiayn.data import Vocabulary
from aiayn.export import CT2_QUANTIZATIONS, ctranslate2_translate_ids, export_ctranslate2, vocabulary_tokens
from aiayn.nn import Transformer, TransformerConfig
from aiayn.translate import translate_ids

WORDS = "the a small big red blue cat dog house tree sees likes runs sleeps near under".split()
needs_ct2 = pytest.mark.skipif(__import__("importlib").util.find_spec("ctranslate2") is None,
                               reason="ctranslate2 is not installed (pip install 'aiayn[ctranslate2]')")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory (vocab.model + a checkpoint) of a tiny model trained until it has memorised
    48 word-reversal pairs: confident predictions, so greedy search has no near-ties that float
    rounding could flip (a random model would). ~4 s on one core."""
    d = tmp_path_factory.mktemp("export_run")
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(200)]
    (d / "corpus.txt").write_text("".join(s + "\n" for s in sentences))
    vocab = Vocabulary.train([str(d / "corpus.txt")], str(d / "vocab"), 60, "bpe")
    pairs = [(vocab.encode(s), vocab.encode(" ".join(s.split()[::-1]))) for s in sentences[:48]]

    def batch(seqs, first=(), last=(2,)):
        seqs = [list(first) + s + list(last) for s in seqs]
        width = max(map(len, seqs))
        return torch.tensor([s + [0] * (width - len(s)) for s in seqs])

    src, tgt = batch([p[0] for p in pairs]), batch([p[1] for p in pairs], first=(1,))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only wait on each other (and on a busy machine)
    try:
        torch.manual_seed(0)
        model = Transformer(TransformerConfig.preset("tiny", len(vocab), num_layers=1, d_model=64, d_ff=128,
                                                     num_heads=4, max_len=64, dropout=0.0))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(80):
            logits = model(src, tgt[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1), ignore_index=0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.3
    model.eval().save(str(d / "checkpoint_00000080.safetensors"))
    os.unlink(d / "corpus.txt")
    return {"dir": d, "model": model.eval(), "vocab": vocab, "sentences": sentences}


def _translator(path):
    import ctranslate2

    return ctranslate2.Translator(str(path), device="cpu", intra_threads=2, inter_threads=1)


@needs_ct2
def test_export_writes_a_ctranslate2_model(run_dir, tmp_path, capsys):
    out = tmp_path / "ct2"
    assert main(["export", "--format", "ctranslate2", str(run_dir["dir"]), str(out)]) == 0
    assert capsys.readouterr().out.startswith("exported ")
    assert {"model.bin", "config.json", "shared_vocabulary.json", "vocab.model"} <= set(os.listdir(out))
    vocab = run_dir["vocab"]
    tokens = json.loads((out / "shared_vocabulary.json").read_text())
    assert tokens == [vocab.sp.IdToPiece(i) for i in range(len(vocab))]  # every id maps to itself
    assert tokens[:4] == ["<pad>", "<s>", "</s>", "<unk>"]
    config = json.loads((out / "config.json").read_text())
    assert config["add_source_eos"] is True and config["add_source_bos"] is False
    assert config["decoder_start_token"] == "<s>" and config["eos_token"] == "</s>" and config["unk_token"] == "<unk>"
    assert config["layer_norm_epsilon"] == pytest.approx(1e-5)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp")]  # staging removed


@needs_ct2
def test_exported_model_scores_as_aiayn(run_dir, tmp_path):
    """Teacher-forced log-probabilities of every target token (EOS included) agree to float32 rounding:
    the weights, the interleaved position table, the embedding scale and the source EOS all map."""
    model, vocab = run_dir["model"], run_dir["vocab"]
    export_ctranslate2(model, tmp_path / "ct2", vocab)
    tokens = vocabulary_tokens(vocab)
    pairs = [(vocab.encode(s), vocab.encode(" ".join(s.split()[::-1]))) for s in run_dir["sentences"][40:60]]
    results = _translator(tmp_path / "ct2").score_batch([[tokens[t] for t in s] for s, _ in pairs],
                                                        [[tokens[t] for t in t_] for _, t_ in pairs])
    for (s, t), r in zip(pairs, results):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([s + [2]]), torch.tensor([[1] + t])), -1)[0]
        ours = [logp[i, token].item() for i, token in enumerate(t + [2])]
        assert r.log_probs == pytest.approx(ours, abs=1e-4)


@needs_ct2
def test_greedy_is_token_identical_and_beam_mostly(run_dir, tmp_path):
    model, vocab = run_dir["model"], run_dir["vocab"]
    export_ctranslate2(model, tmp_path / "ct2", vocab)
    translator, tokens = _translator(tmp_path / "ct2"), vocabulary_tokens(vocab)
    src = [vocab.encode(s) for s in run_dir["sentences"][:120]]  # 48 memorised, 72 unseen
    ours = translate_ids(model, src, beam=1, batch_size=16)
    theirs = ctranslate2_translate_ids(translator, src, tokens, beam=1, batch_size=16)
    assert theirs == ours
    assert all(len(h) > 0 for h in ours)
    ours4 = translate_ids(model, src, beam=4, alpha=0.6, batch_size=16)
    theirs4 = ctranslate2_translate_ids(translator, src, tokens, beam=4, alpha=0.6, batch_size=16)
    agree = sum(a == b for a, b in zip(ours4, theirs4)) / len(src)
    assert agree >= 0.8, agree  # the length penalties differ (length ** alpha vs GNMT's)


@needs_ct2
@pytest.mark.parametrize("quantization", ["int8", "bf16"])
def test_export_does_not_modify_the_model(run_dir, tmp_path, quantization):
    model = run_dir["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_ctranslate2(model, tmp_path / "ct2", run_dir["vocab"], quantization)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    if quantization == "int8":  # int8 weights still decode (almost) as the float32 model does
        tokens = vocabulary_tokens(run_dir["vocab"])
        src = [run_dir["vocab"].encode(s) for s in run_dir["sentences"][:48]]
        ours = translate_ids(model, src, beam=1)
        theirs = ctranslate2_translate_ids(_translator(tmp_path / "ct2"), src, tokens, beam=1)
        assert sum(a == b for a, b in zip(ours, theirs)) >= 0.8 * len(src)


@needs_ct2
def test_bf16_and_pre_ln_models_export(run_dir, tmp_path):
    """A bf16 aiayn model exports as its float32 values; a pre-LN model with unshared embeddings maps
    its final LayerNorms and separate matrices (scores checked as above)."""
    import aiayn

    vocab = run_dir["vocab"]
    export_ctranslate2(aiayn.quantize(run_dir["model"], "bf16"), tmp_path / "bf16", vocab)
    torch.manual_seed(1)
    model = Transformer(TransformerConfig.preset("tiny", len(vocab), max_len=64, norm_first=True,
                                                 share_embeddings=False)).eval()
    export_ctranslate2(model, tmp_path / "preln", vocab)
    tokens = vocabulary_tokens(vocab)
    s, t = vocab.encode("the cat sees a dog"), vocab.encode("dog a sees cat the")
    r = _translator(tmp_path / "preln").score_batch([[tokens[i] for i in s]], [[tokens[i] for i in t]])[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([s + [2]]), torch.tensor([[1] + t])), -1)[0]
    assert r.log_probs == pytest.approx([logp[i, token].item() for i, token in enumerate(t + [2])], abs=1e-4)


def test_quantization_names_match_ctranslate2():
    ct2 = pytest.importorskip("ctranslate2")
    assert set(CT2_QUANTIZATIONS) == set(ct2.specs.model_spec.ACCEPTED_MODEL_TYPES)


# --- bad input: one line naming the argument, exit status 2, nothing written ----------------------


def _fails(capsys, *args):
    assert main(["export", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("aiayn export: error: "), err
    return err


def test_target_that_exists_is_refused(run_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert "'" + str(tmp_path / "out") + "' already exists" in _fails(capsys, run_dir["dir"], tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["keep.txt"] and (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("mine")
    assert "is a file" in _fails(capsys, run_dir["dir"], tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"


def test_unknown_format_and_quantization(run_dir, tmp_path, capsys):
    assert "--format 'onnx'" in _fails(capsys, run_dir["dir"], tmp_path / "a", "--format", "onnx")
    assert "--quantization 'int4'" in _fails(capsys, run_dir["dir"], tmp_path / "b", "--quantization", "int4")
    assert os.listdir(tmp_path) == []


def test_not_an_aiayn_checkpoint(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    assert "no aiayn config" in _fails(capsys, tmp_path / "other.safetensors", tmp_path / "out")
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    assert "truncated or corrupt" in _fails(capsys, tmp_path / "junk.safetensors", tmp_path / "out")
    assert "does not exist" in _fails(capsys, tmp_path / "missing.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_or_mismatched_vocabulary(run_dir, tmp_path, capsys):
    torch.manual_seed(0)
    Transformer(TransformerConfig.preset("tiny", 100, max_len=64)).save(str(tmp_path / "m.safetensors"))
    assert "--vocab" in _fails(capsys, tmp_path / "m.safetensors", tmp_path / "out")
    err = _fails(capsys, tmp_path / "m.safetensors", tmp_path / "out", "--vocab", run_dir["dir"] / "vocab.model")
    assert "different runs" in err
    assert not (tmp_path / "out").exists()


def test_ctranslate2_not_installed(run_dir, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # import ctranslate2 -> ImportError
    assert "pip install 'aiayn[ctranslate2]'" in _fails(capsys, run_dir["dir"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
