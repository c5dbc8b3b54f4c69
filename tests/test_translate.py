"""`aiayn translate` on real files (issue 22): batches sorted by length with the output in input
order, --input/--output, the speed line, non-UTF-8 input named by line, bf16 inference through
aiayn.quantize, and the bad inputs of the command."""

import io
import os
import subprocess
import sys

import pytest
import torch

import aiayn
from aiayn.data import Vocabulary
from aiayn.nn import Transformer, TransformerConfig
from aiayn.translate import length_batches, translate_stream

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(aiayn.__file__)))
WORDS = "the a small big red blue cat dog house tree sees likes runs sleeps near under".split()


def run_aiayn(*args, stdin=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "aiayn", *args], input=stdin, env=env, capture_output=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A run directory with a vocabulary and an (untrained) tiny model: enough to test the plumbing."""
    import random

    d = tmp_path_factory.mktemp("translate")
    rng = random.Random(0)
    text = d / "corpus.txt"
    text.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) + "\n" for _ in range(200)))
    vocab = Vocabulary.train([str(text)], str(d / "vocab"), 60, "bpe")
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.preset("tiny", len(vocab), max_len=64))
    model.save(str(d / "checkpoint_00000001.safetensors"))
    return d


class _EchoModel(torch.nn.Module):
    """generate() returns each source reversed (without EOS and padding): a model whose correct
    output is known, so that batching and reordering can be checked exactly."""

    def __init__(self):
        super().__init__()
        self.config = TransformerConfig.preset("tiny", 100, max_len=64)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.batches = []

    def generate(self, src, mask, **kwargs):
        self.batches.append(src.shape[0])
        self.kwargs = kwargs
        return [[t for t, m in zip(row.tolist(), pad.tolist()) if not m and t != self.config.eos_id][::-1]
                for row, pad in zip(src, mask)]


class _Chars:
    """A vocabulary of single characters (ids 10 + ord(c) - ord('a'))."""

    def encode(self, text):
        return [10 + ord(c) - ord("a") for c in text.replace(" ", "")]

    def decode(self, ids):
        return "".join(chr(ord("a") + i - 10) for i in ids)


def test_batches_are_sorted_and_output_is_in_input_order():
    rng = __import__("random").Random()
    lines = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 30))) for _ in range(137)]
    lines[5] = lines[77] = ""  # empty lines stay empty and are not translated
    model, out = _EchoModel(), io.StringIO()
    data = io.BytesIO("".join(line + "\n" for line in lines).encode())
    stats = translate_stream(model, _Chars(), data, out, batch_size=8, chunk_lines=50)
    assert out.getvalue().split("\n")[:-1] == [line[::-1] for line in lines]
    assert stats["sentences"] == 135 and stats["target_tokens"] == sum(len(x) + 1 for x in lines if x)
    assert max(model.batches) <= 8 and sum(model.batches) == 135


def test_beam_stop_rule_reaches_generate(checkpoint, tmp_path):
    model = _EchoModel()
    translate_stream(model, _Chars(), io.BytesIO(b"abc\n"), io.StringIO(), early_stopping=False)
    assert model.kwargs["early_stopping"] is False
    translate_stream(model, _Chars(), io.BytesIO(b"abc\n"), io.StringIO())
    assert "early_stopping" not in model.kwargs  # the default: generate's own (fairseq's count)
    # the command line: --beam-stop bound gives translate_ids(early_stopping=False)'s output
    from aiayn.translate import load_translator, translate_ids

    src = tmp_path / "in.txt"
    lines = ["the cat sees a dog", "red tree near the house", "a big blue house runs"]
    src.write_text("\n".join(lines) + "\n")
    r = run_aiayn("translate", "--checkpoint", str(checkpoint), "--input", str(src), "--beam", "3",
                  "--max-len-offset", "6", "--beam-stop", "bound", "-q", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    model, vocab = load_translator(str(checkpoint))
    ids = [vocab.encode(line) for line in lines]
    want = translate_ids(model, ids, beam=3, max_len_offset=6, early_stopping=False)
    assert r.stdout.decode().split("\n")[:-1] == [vocab.decode(h) for h in want]
    r = run_aiayn("translate", "--checkpoint", str(checkpoint), "--beam-stop", "never")
    assert r.returncode == 2 and "--beam-stop" in r.stderr.decode() and "invalid choice" in r.stderr.decode()


def test_length_batches():
    lengths = [5, 1, 9, 9, 3, 7, 2]
    batches = length_batches(lengths, batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert [[lengths[i] for i in b] for b in batches] == [[9, 9, 7], [5, 3, 2], [1]]
    budget = length_batches(lengths, batch_size=100, max_tokens=18)  # padded tokens: longest * count
    assert all(max(lengths[i] for i in b) * len(b) <= 18 or len(b) == 1 for b in budget)
    assert [[lengths[i] for i in b] for b in budget] == [[9, 9], [7, 5], [3, 2, 1]]


def test_bad_utf8_names_the_line_and_keeps_earlier_output():
    model, out = _EchoModel(), io.StringIO()
    data = io.BytesIO(b"abc\nde\n\xff\xfe\x00\nfg\n")
    with pytest.raises(aiayn.errors.UserInputError, match=r"standard input line 3 is not UTF-8 .*0xff"):
        translate_stream(model, _Chars(), data, out, name="standard input")
    assert out.getvalue() == "cba\ned\n"


def test_cli_files_speed_line_and_bf16(checkpoint, tmp_path):
    src = tmp_path / "in.txt"
    lines = ["the cat sees a dog", "", "red tree near the house", "a"]
    src.write_text("\n".join(lines) + "\n")
    outputs = {}
    for mode in ([], ["--quantize", "bf16"]):
        dst = tmp_path / f"out{len(mode)}.txt"
        r = run_aiayn("translate", "--checkpoint", str(checkpoint), "--input", str(src), "--output", str(dst),
                      "--beam", "2", "--max-len-offset", "5", "--batch-size", "2", "--threads", "1", *mode)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout == b""
        last = r.stderr.decode().strip().splitlines()[-1]
        assert last.startswith("translated 3 sentences") and "sentences/s" in last and "tokens/s" in last
        outputs[len(mode)] = dst.read_text().split("\n")
        assert len(outputs[len(mode)]) == len(lines) + 1 and outputs[len(mode)][1] == ""
    piped = run_aiayn("translate", "--checkpoint", str(checkpoint), "--beam", "2", "--max-len-offset", "5", "-q",
                      stdin=src.read_bytes())
    assert piped.returncode == 0 and piped.stderr == b""
    assert piped.stdout.decode().split("\n") == outputs[0]  # stdin/stdout = the file route, same batching


def _one_line_error(r):
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_cli_bad_inputs(checkpoint, tmp_path):
    r = run_aiayn("translate", "--checkpoint", str(checkpoint), stdin=b"the cat\n\xff\xfe\x00\n")
    assert "standard input line 2 is not UTF-8" in _one_line_error(r)
    assert len(r.stdout.decode().split("\n")) == 2  # line 1 was translated and written first
    src = tmp_path / "in.txt"
    src.write_text("the cat\n")
    r = run_aiayn("translate", "--checkpoint", str(checkpoint), "--input", str(src), "--output", str(src))
    assert "would be overwritten" in _one_line_error(r) and src.read_text() == "the cat\n"
    r = run_aiayn("translate", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "missing.txt"))
    assert "does not exist" in _one_line_error(r)
    not_model = tmp_path / "not_a_model.safetensors"
    not_model.write_bytes(b"\x00" * 64)
    r = run_aiayn("translate", "--checkpoint", str(not_model), "--vocab", str(checkpoint / "vocab.model"))
    assert "truncated or corrupt" in _one_line_error(r)
    r = run_aiayn("translate", "--checkpoint", str(checkpoint), "--quantize", "int4")
    assert r.returncode == 2 and "invalid choice" in r.stderr.decode()


def test_quantize_bf16_is_a_copy():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.preset("tiny", 40)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = aiayn.quantize(model, "bf16")
    assert q is not model and aiayn.quantization.quantization_of(q) == "bf16" and not q.training
    assert {p.dtype for p in q.parameters()} == {torch.bfloat16}
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k])  # the source model is untouched
    src = torch.randint(3, 40, (3, 6))
    hyps = q.generate(src, beam_size=3, max_len_offset=4)
    assert len(hyps) == 3 and all(isinstance(t, int) for h in hyps for t in h)
    with pytest.raises(ValueError, match="already quantized"):
        aiayn.quantize(q, "bf16")
    with pytest.raises(ValueError, match="already quantized"):
        aiayn.quantize(q, "int8")
    with pytest.raises(ValueError, match="'mode' must be one of"):
        aiayn.quantize(model, "fp8")
    with pytest.raises(TypeError, match="aiayn.nn.Transformer"):
        aiayn.quantize(torch.nn.Linear(2, 2), "bf16")


def test_bf16_logits_close_to_float32():
    """bf16 inference changes the numbers by bf16 rounding, not more: the decoder's log-probs of
    the same prefix stay close to float32's."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.preset("tiny", 50)).eval()
    q = aiayn.quantize(model, "bf16")
    src, tgt = torch.randint(3, 50, (4, 9)), torch.randint(3, 50, (4, 7))
    with torch.no_grad():
        ref = torch.log_softmax(model(src, tgt).double(), -1)
        got = torch.log_softmax(q(src, tgt).double(), -1)
    assert (got - ref).abs().max() < 0.15


def test_bf16_model_saves_loads_and_translates(checkpoint, tmp_path):
    """A quantized model round-trips through safetensors in bf16 (marked), `aiayn translate` takes
    it as is, and quantizing it again is a one-line error."""
    model = Transformer.load(str(checkpoint / "checkpoint_00000001.safetensors"))
    q = aiayn.quantize(model, "bf16")
    run = tmp_path / "bf16run"
    run.mkdir()
    q.save(str(run / "checkpoint_00000001.safetensors"))
    (run / "vocab.model").write_bytes((checkpoint / "vocab.model").read_bytes())
    back = Transformer.load(str(run / "checkpoint_00000001.safetensors"))
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    assert aiayn.quantization.quantization_of(back) == "bf16"
    for k, v in q.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    r = run_aiayn("translate", "--checkpoint", str(run), "--beam", "2", "--max-len-offset", "4", "-q",
                  stdin=b"the cat\n")
    assert r.returncode == 0 and len(r.stdout.decode().split("\n")) == 2, r.stderr.decode()
    r = run_aiayn("translate", "--checkpoint", str(run), "--quantize", "bf16", stdin=b"the cat\n")
    assert "already quantized" in _one_line_error(r)
