"""The `aiayn` command: the demo reaches its accuracy bar, train / translate / average-checkpoints
work end to end, and every bad input ends in one line on stderr with exit status 2."""

import os
import re
import subprocess
import sys

import pytest

import aiayn
from aiayn.cli import main
from aiayn.demo import QUICK
from aiayn.train.checkpoint import checkpoint_steps, model_path, state_path

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(aiayn.__file__)))
WORDS = "the a small big red blue cat dog house tree sees likes runs sleeps near under".split()


def run_aiayn(*args, stdin=None, timeout=300, env_extra=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")])),
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "aiayn", *args], input=stdin, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A toy parallel corpus: the target is the source reversed word by word."""
    import random

    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    src = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(300)]
    tgt = [" ".join(s.split()[::-1]) for s in src]
    return {"src": write_lines(d / "train.src", src[:260]), "tgt": write_lines(d / "train.tgt", tgt[:260]),
            "valid_src": write_lines(d / "valid.src", src[260:]), "valid_tgt": write_lines(d / "valid.tgt", tgt[260:]),
            "dir": d}


def train_args(corpus, out, *extra):
    return ["train", "--src", corpus["src"], "--tgt", corpus["tgt"], "--valid-src", corpus["valid_src"],
            "--valid-tgt", corpus["valid_tgt"], "--config", "tiny", "--out", str(out), "--vocab-size", "60",
            "--max-tokens", "400", "--warmup", "4", "--save-every", "2", "--valid-every", "4",
            "--bleu-sentences", "8", "--beam", "1", "--no-progress", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(train_args(corpus, out, "--steps", "4")) == 0
    return out


@pytest.mark.parametrize("isa,seed", [(None, 0), ("avx2", 1)])
def test_demo_quick_reaches_its_bar(tmp_path, isa, seed):
    """The quick demo on the default ISA and on AVX2 with another seed (the full demo's 1.000 on
    seeds 0-2, AVX-512 and AVX2, was measured by hand: demo.py). ~70 s each on an idle 2-core CPU;
    a shared, loaded machine can take several times that."""
    if isa is not None and not aiayn._C.cpu_isa_supported(isa):
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    out = run_aiayn("demo", "--quick", "--no-progress", "--seed", str(seed), "--out", str(tmp_path), timeout=900,
                    env_extra={"AIAYN_CPU_ISA": isa} if isa else None)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"exact-match accuracy: (\d\.\d{3})", last)
    assert match, out.stdout
    assert float(match.group(1)) >= QUICK.bar, out.stdout
    for name in ("loss_curve.png", "attention.png", "log.json"):
        assert os.path.getsize(tmp_path / name) > 1000


def test_train_writes_run_and_resumes_exactly(corpus, trained, tmp_path):
    import json

    assert checkpoint_steps(str(trained)) == [2, 4]
    for name in ("vocab.model", "log.json", "loss_curve.png", "run.json"):
        assert os.path.exists(trained / name)
    log = json.load(open(trained / "log.json"))
    assert [e["step"] for e in log["train"]] == [1, 2, 3, 4]
    assert "bleu" in log["valid"][-1] and log["valid"][-1]["step"] == 4
    # the same run interrupted after 2 steps and resumed: the same losses
    assert main(train_args(corpus, tmp_path, "--steps", "2")) == 0
    assert main(train_args(corpus, tmp_path, "--steps", "4", "--resume")) == 0
    resumed = json.load(open(tmp_path / "log.json"))
    assert [e["loss"] for e in resumed["train"]] == [e["loss"] for e in log["train"]]


def test_translate_streams_and_average(trained, corpus):
    lines = ["the cat sees a dog", "", "red tree"]
    out = run_aiayn("translate", "--checkpoint", str(trained), "--beam", "2", stdin="\n".join(lines) + "\n")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split("\n")) == len(lines) + 1 and out.stdout.split("\n")[1] == ""
    assert main(["average-checkpoints", str(trained), "--last", "2"]) == 0
    assert os.path.exists(trained / "averaged.safetensors")


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_train_bad_inputs(corpus, trained, capsys, tmp_path):
    base = dict(corpus)
    missing = dict(base, src=str(tmp_path / "missing.src"))
    assert "does not exist" in _error(capsys, train_args(missing, tmp_path / "o1", "--steps", "1"))
    short = dict(base, tgt=write_lines(tmp_path / "short.tgt", ["a b"] * 10))
    assert re.search(r"has 260 lines but .* has 10", _error(capsys, train_args(short, tmp_path / "o2", "--steps", "1")))
    empty = dict(base, valid_src=write_lines(tmp_path / "empty.src", ["a"] * 20 + [" "] + ["b"] * 19))
    assert "line 21 is empty" in _error(capsys, train_args(empty, tmp_path / "o3", "--steps", "1"))
    # the run directory holds a tiny model; resuming it as another config is refused
    # (the last --config wins)
    assert "another config" in _error(capsys, train_args(corpus, trained, "--steps", "5", "--resume", "--config", "base"))
    assert "already holds checkpoints" in _error(capsys, train_args(corpus, trained, "--steps", "5"))


def test_corrupt_checkpoint_errors(corpus, trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for name in ("averaged.safetensors", "best.safetensors"):  # translate would take these first
        if os.path.exists(run / name):
            os.remove(run / name)
    path = model_path(str(run), 4)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 3])
    out = run_aiayn("translate", "--checkpoint", str(run), stdin="the cat\n")
    assert out.returncode == 2 and "truncated or corrupt" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    shutil.copyfile(model_path(str(trained), 4), path)
    state = state_path(str(run), 4)
    open(state, "wb").write(open(state, "rb").read()[:100])
    out = run_aiayn(*train_args(corpus, run, "--steps", "6", "--resume"))
    assert out.returncode == 2 and "truncated or corrupt" in out.stderr and "Traceback" not in out.stderr
    out = run_aiayn("translate", "--checkpoint", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_info_still_works():
    out = run_aiayn("info")
    assert out.returncode == 0 and '"version"' in out.stdout


@pytest.mark.parametrize("argv, names", [
    ([], "command"),
    (["translate", "--checkpoint", "x", "--beam-stop", "zz"], "--beam-stop"),
    (["train", "--layers", "x"], "--layers"),
    (["evaluate", "--checkpoint", "x"], "--src"),
    (["bench", "--no-such-flag"], "--no-such-flag"),
])
def test_usage_errors_are_one_line(argv, names, capsys):
    # argparse prints its whole usage before the error; ours is the error alone, naming the
    # argument, with a pointer to --help, and exit status 2
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert names in err and "--help" in err and err.startswith("aiayn")
