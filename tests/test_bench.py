"""The benchmark harness behaves: CLI, table, JSON, registry, filter, list, plot. Speeds are not
asserted here (tests check behaviour; the benchmarks themselves report speed)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import aiayn
from aiayn import bench
from aiayn.bench.__main__ import main

# The folder holding the aiayn package this test imported (a source checkout built in place, or
# site-packages): subprocesses must run that same build.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(aiayn.__file__)))
CASE = "add_dropout_layer_norm"


def _run(*args, cache_dir):
    os.makedirs(cache_dir, exist_ok=True)
    env = {**os.environ, "AIAYN_CACHE_DIR": str(cache_dir),
           "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "aiayn.bench", *args], cwd=str(cache_dir), env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = _run("--quick", "--filter", CASE, "--json", str(tmp / "tmp.json"), "--repeats", "3", cache_dir=tmp / "cache")
    return out, tmp


def test_cli_prints_table(quick_run):
    out, _ = quick_run
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = next(line for line in lines if line.startswith("case"))
    for column in ("shape", "dtype", "device", "aiayn ms", "torch ms", "speed-up", "GFLOP/s", "GB/s", "% peak"):
        assert column in header
    rows = [line.split() for line in lines if line.startswith(CASE)]
    assert sorted((r[0], r[2]) for r in rows) == sorted(
        (f"{CASE}.{kind}", dtype) for kind in ("fwd", "fwd_bwd") for dtype in ("float32", "bfloat16"))
    for r in rows:
        assert r[1] == "3072x512" and r[3] == "cpu" and r[6].endswith("x")
        assert float(r[4]) > 0 and float(r[5]) > 0
    assert "peaks:" in out.stdout


def test_cli_writes_json(quick_run):
    _, tmp = quick_run
    report = json.loads((tmp / "tmp.json").read_text())
    assert {"build_info", "peaks", "results", "settings", "device"} <= report.keys()
    assert report["build_info"]["version"] == aiayn.__version__ and report["torch_version"] == torch.__version__
    assert report["settings"]["repeats"] == 3 and report["settings"]["quick"] is True
    peaks = report["peaks"]
    assert peaks["flops"]["float32"] > 0 and peaks["bandwidth"] > 0
    assert peaks["machine"]["device"] == "cpu" and os.path.exists(peaks["cache"])
    assert len(report["results"]) == 4
    for r in report["results"]:
        assert r["status"] == "ok" and r["device"] == "cpu" and r["shape"] == [3072, 512]
        assert r["dtype"] in ("float32", "bfloat16")
        assert len(r["aiayn_samples_ms"]) == len(r["torch_samples_ms"]) == 3
        assert r["speedup"] == pytest.approx(r["torch_ms"] / r["aiayn_ms"])
        assert r["gbps"] == pytest.approx(r["bytes"] / r["aiayn_ms"] / 1e6)
        assert r["peak_kind"] == "bandwidth" and r["pct_peak"] > 0


def _fake_machine(monkeypatch, tmp_path, measured, probe):
    """peaks() with measure_cpu returning `measured` (a dict, or a list taken in turn) and the
    cache check's probe returning `probe` FLOP/s; returns the list of measure_cpu calls."""
    monkeypatch.setenv("AIAYN_CACHE_DIR", str(tmp_path))
    calls = []

    def measure():
        calls.append(1)
        m = measured[len(calls) - 1] if isinstance(measured, list) else measured
        return json.loads(json.dumps(m))  # a fresh copy each time, as a real measurement is

    monkeypatch.setattr(bench.peak, "measure_cpu", measure)
    monkeypatch.setattr(bench.peak, "_probe_flops", lambda *a, **k: probe)
    return calls


def test_peaks_are_cached(tmp_path, monkeypatch):
    calls = _fake_machine(monkeypatch, tmp_path, {"flops": {"float32": 1e9}, "bandwidth": 1e9}, probe=0.9e9)
    first = bench.peak.peaks("cpu")
    second = bench.peak.peaks("cpu")
    assert not first["cached"] and second["cached"] and first["cache"] == second["cache"] and len(calls) == 1
    assert second["flops"] == {"float32": 1e9} and "warning" not in second and "corrected_from" not in second
    bench.peak.peaks("cpu", remeasure=True)
    assert len(calls) == 2


def test_too_low_cached_peak_is_corrected(tmp_path, monkeypatch):
    """A peak cached while another program used the CPU (issue 23: 105 GFLOP/s cached on a ~200
    GFLOP/s machine) is measured again as soon as a probe beats it, and the better values stay."""
    low = {"flops": {"float32": 1e9, "bfloat16": 3e9}, "bandwidth": 5e9}
    good = {"flops": {"float32": 4e9, "bfloat16": 2e9}, "bandwidth": 1e9}  # bf16/bandwidth: busy this time
    calls = _fake_machine(monkeypatch, tmp_path, [low, good], probe=1.5e9)
    bench.peak.peaks("cpu")
    fixed = bench.peak.peaks("cpu")
    assert len(calls) == 2 and not fixed["cached"] and fixed["corrected_from"] == 1e9
    assert fixed["flops"] == {"float32": 4e9, "bfloat16": 3e9} and fixed["bandwidth"] == 5e9  # max of both
    on_disk = json.loads(open(fixed["cache"]).read())
    assert on_disk["flops"]["float32"] == 4e9 and "corrected_from" not in on_disk
    again = bench.peak.peaks("cpu")  # the probe (1.5e9) no longer beats the cache: no third measurement
    assert again["cached"] and again["flops"]["float32"] == 4e9 and len(calls) == 2


def test_real_probe_corrects_an_impossible_cache(tmp_path, monkeypatch):
    """The same with the real probe: 1 MFLOP/s cached is below anything a CPU does."""
    monkeypatch.setenv("AIAYN_CACHE_DIR", str(tmp_path))
    measured = []
    monkeypatch.setattr(bench.peak, "measure_cpu",
                        lambda: measured.append(1) or {"flops": {"float32": 1e6 if len(measured) == 1 else 2e11},
                                                       "bandwidth": 1e9})
    bench.peak.peaks("cpu")
    fixed = bench.peak.peaks("cpu")
    assert len(measured) == 2 and fixed["corrected_from"] == 1e6 and fixed["flops"]["float32"] == 2e11


def test_busy_machine_is_reported_not_cached(tmp_path, monkeypatch):
    calls = _fake_machine(monkeypatch, tmp_path, {"flops": {"float32": 4e9}, "bandwidth": 1e9}, probe=1e9)
    bench.peak.peaks("cpu")
    busy = bench.peak.peaks("cpu")
    assert len(calls) == 1 and busy["cached"] and busy["flops"]["float32"] == 4e9
    assert "busy" in busy["warning"] and "25%" in busy["warning"]
    assert "warning" not in json.loads(open(busy["cache"]).read())


def test_busy_fresh_measurement_is_reported(tmp_path, monkeypatch):
    _fake_machine(monkeypatch, tmp_path, {"flops": {"float32": 4e9}, "bandwidth": 1e9, "float32_runs": [1e9, 4e9]},
                  probe=4e9)
    first = bench.peak.peaks("cpu")
    assert not first["cached"] and "looked busy" in first["warning"]


def test_case_faster_than_the_peak_raises_it(tmp_path, monkeypatch, restore_registry):
    """A case cannot beat the machine's peak, so when it seems to the peak is raised (in the run and
    in the cache) and the row never shows more than 100%."""
    calls = _fake_machine(monkeypatch, tmp_path, {"flops": {"float32": 1e3}, "bandwidth": 1e12}, probe=1e3)
    peaks = bench.peak.peaks("cpu")
    assert len(calls) == 1

    @bench.register("toy.flops", dtypes=(torch.float32,), devices=("cpu",))
    def _(device, dtype, quick):
        x = torch.randn(4096, device=device, dtype=dtype)
        return bench.Bench(aiayn=lambda: x * 2, torch=lambda: x + x, shape=x.shape, flops=4096)

    r = bench.run_case(bench.CASES["toy.flops"], torch.float32, "cpu", repeats=2, peaks=peaks, warmup=1,
                       min_sample_s=1e-4)
    assert r["status"] == "ok" and r["gflops"] * 1e9 > 1e3
    assert r["peak_kind"] == "float32 peak" and r["pct_peak"] <= 100.0 + 1e-9
    assert r["peak_raised"]["from"] == 1e3 and r["peak_raised"]["to"] >= r["gflops"] * 1e9
    assert peaks["raised"] == {"float32": 1e3}
    on_disk = json.loads(open(peaks["cache"]).read())
    assert on_disk["flops"]["float32"] == peaks["flops"]["float32"] and "raised" not in on_disk


def test_cli_never_prints_more_than_100_percent_of_peak(tmp_path):
    """A cache holding an impossible peak (1 GFLOP/s): the run measures again before timing, and
    no row's % peak column exceeds 100."""
    cache = tmp_path / "cache"
    first = _run("--quick", "--filter", "feed_forward.fwd_small$", "--repeats", "2", cache_dir=cache)
    assert first.returncode == 0, first.stderr
    (path,) = cache.glob("peaks-*.json")
    data = json.loads(path.read_text())
    data["flops"]["float32"] = 1e9
    path.write_text(json.dumps(data))
    out = _run("--quick", "--filter", "feed_forward.fwd_small$", "--repeats", "2", cache_dir=cache)
    assert out.returncode == 0, out.stderr
    assert "measured again" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("feed_forward.fwd_small")]
    assert rows
    for row in rows:
        pct = int(row.split()[-3].rstrip("%"))
        assert 0 < pct <= 100, row
    assert json.loads(path.read_text())["flops"]["float32"] > 1e9


@pytest.fixture
def restore_registry():
    saved = dict(bench.CASES)
    yield
    bench.CASES.clear()
    bench.CASES.update(saved)


def test_registry_and_filter(restore_registry):
    @bench.register("toy.scale", dtypes=(torch.float32,), devices=("cpu",))
    def _(device, dtype, quick):
        x = torch.randn(64, device=device, dtype=dtype)
        return bench.Bench(aiayn=lambda: x * 2, torch=lambda: x + x, shape=x.shape, flops=64, bytes=2 * x.nbytes)

    with pytest.raises(ValueError, match="already registered"):
        bench.register("toy.scale")(lambda device, dtype, quick: None)
    names = lambda pattern, device=None: [c.name for c in bench.select(pattern, device)]  # noqa: E731
    assert names("toy") == ["toy.scale"]
    assert names(r"^toy\.sc") == ["toy.scale"]  # regex
    assert names("toy.scale", "cuda") == []
    assert f"{CASE}.fwd" in names(CASE) and f"{CASE}.fwd_bwd" in names("fwd_bwd")
    assert names("[unbalanced") == []  # not a valid regex, not a substring

    peaks = {"flops": {"float32": 1e12}, "bandwidth": 1e11}
    r = bench.run_case(bench.CASES["toy.scale"], torch.float32, "cpu", repeats=2, peaks=peaks, warmup=1, min_sample_s=1e-4)
    assert r["status"] == "ok" and r["shape"] == [64] and len(r["aiayn_samples_ms"]) == 2
    assert r["gflops"] > 0 and r["gbps"] > 0 and r["peak_kind"] in ("float32 peak", "bandwidth")


def test_failing_case_is_reported_not_raised(monkeypatch):
    def broken(device, dtype, quick):
        raise RuntimeError("boom")

    def missing(device, dtype, quick):
        raise NotImplementedError("Could not run 'aiayn::x' with arguments from the 'CUDA' backend")

    peaks = {"flops": {}, "bandwidth": 1e11}
    r = bench.run_case(bench.Case("broken", broken, (torch.float32,), ("cpu",)), torch.float32, "cpu", repeats=1, peaks=peaks)
    assert r["status"] == "error" and "boom" in r["error"]
    r = bench.run_case(bench.Case("missing", missing, (torch.float32,), ("cpu",)), torch.float32, "cpu", repeats=1, peaks=peaks)
    assert r["status"] == "skipped"


def test_list(capsys):
    assert main(["--list", "--filter", CASE]) == 0
    out = capsys.readouterr().out
    assert f"{CASE}.fwd " in out and f"{CASE}.fwd_bwd " in out and "bfloat16" in out


def test_aiayn_bench_subcommand():
    from aiayn.cli import main as cli_main

    assert cli_main(["bench", "--list", "--filter", "fwd_bwd"]) == 0


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--filter", "no_such_case_anywhere"])
    assert e.value.code == 2 and "no case matches" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            main(["--device", "cuda"])
        assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_plot(tmp_path):
    results = [{"name": "a.fwd", "dtype": "float32", "device": "cpu", "status": "ok", "speedup": 4.2},
               {"name": "a.fwd", "dtype": "bfloat16", "device": "cpu", "status": "ok", "speedup": 0.8},
               {"name": "b", "dtype": "float32", "device": "cpu", "status": "error", "error": "x"}]
    from aiayn.bench.__main__ import plot

    plot(results, tmp_path / "speedups.png")
    assert (tmp_path / "speedups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _subprocess_env():
    """The environment of a `python -m aiayn...` child: this checkout's package first on the path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))}


def test_memory_probe_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "aiayn.bench.memory", "--length", "64", "--heads", "1"],
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                         env=_subprocess_env())
    assert out.returncode == 0, out.stderr
    assert "peak RSS growth" in out.stdout and "L64" in out.stdout


def test_train_memory_probe_runs(tmp_path):
    """The base-model step's memory probe (python -m aiayn.bench.train_memory), on the tiny model:
    a line per engine (each in its own process) and the ratio line."""
    out = subprocess.run([sys.executable, "-m", "aiayn.bench.train_memory", "--config", "tiny", "--vocab", "50",
                          "--tokens", "128", "--steps", "1"],
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                         env=_subprocess_env())
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and "aiayn float32" in lines[0] and "nn.Transformer float32" in lines[1], out.stdout
    assert "128 tokens per step" in lines[0] and "peak RSS" in lines[1] and "aiayn / nn.Transformer" in lines[2]
    bad = subprocess.run([sys.executable, "-m", "aiayn.bench.train_memory", "--steps", "0"], cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=300,
                         env=_subprocess_env())
    assert bad.returncode == 2 and "--steps must be >= 1" in bad.stderr


def test_translate_engines_case(restore_registry, capsys):
    """The translate cases' runner on a tiny random model and 6 sentences: every engine's row
    (int8 / CTranslate2 rows skipped with a note where those are missing), agreement with aiayn
    float32, and the printed block."""
    from aiayn.bench.__main__ import _engine_lines
    from aiayn.bench.cases import _corpus_pairs, translate_engines

    torch.manual_seed(0)
    model = aiayn.nn.Transformer(aiayn.nn.TransformerConfig.preset("tiny", 50, max_len=64))
    tokens = ["<pad>", "<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(4, 50)]
    src = [s[:6] for s, _ in _corpus_pairs(6, 50)]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    @bench.register("toy.translate", devices=("cpu",), baseline="engines")
    def _(device, dtype, quick):
        return translate_engines(model, tokens, src, setting="toy", max_len_offset=3, batch_size=4)

    r = bench.run_case(bench.CASES["toy.translate"], torch.float32, "cpu", repeats=5, peaks={}, quick=False)
    assert r["status"] == "ok" and r["kind"] == "engines" and r["passes"] == bench.MAX_ENGINE_PASSES
    rows = {e["engine"]: e for e in r["engines"]}
    assert list(rows) == ["aiayn float32", "aiayn bf16", "aiayn int8", "aiayn int8_bf16", "ctranslate2 float32",
                          "ctranslate2 int8"]
    assert rows["aiayn float32"]["agreement"] == 1.0 and rows["aiayn float32"]["sentences_per_s"] > 0
    for e in rows.values():
        assert e["status"] == "ok" or e["note"].startswith("skipped: "), e
        if e["status"] == "ok":
            assert len(e["samples_s"]) == 3 and e["target_tokens"] >= 6 and 0 <= e["agreement"] <= 1
    if importlib.util.find_spec("ctranslate2") is not None:
        assert rows["ctranslate2 float32"]["status"] == "ok"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    text = "\n".join(_engine_lines(r))
    assert "sentences/s" in text and "aiayn bf16" in text and "length ** alpha" in text
    json.dumps(r)  # the --json report holds it as is


def test_translate_options_are_checked(capsys, tmp_path):
    for args, message in ((["--checkpoint", str(tmp_path)], "go together"),
                          (["--checkpoint", str(tmp_path), "--src", str(tmp_path / "no.txt")], "does not exist"),
                          (["--src", str(tmp_path / "no.txt")], "go together")):
        with pytest.raises(SystemExit) as e:
            main(["--filter", "translate", *args])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_base_train_step_case_runs():
    """model.train_step.base at its quick shapes: aiayn's fused projection + loss against the
    baseline's logits + cross-entropy, both with the Trainer's optimizer (issue 21's "same Trainer")."""
    case = bench.CASES["model.train_step.base"]
    r = bench.run_case(case, torch.float32, "cpu", repeats=1, peaks={}, quick=True, warmup=0, min_sample_s=0)
    assert r["status"] == "ok" and r["speedup"] > 0 and r["baseline"] == "nn.Transformer, same optimizer", r
