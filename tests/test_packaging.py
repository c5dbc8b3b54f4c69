"""The source distribution holds everything the build needs (issue 23: it once left out every header
under csrc/, so `pip install aiayn-X.tar.gz` failed). scripts/package_check.sh, run by CI, goes
further: it builds a wheel from the sdist in a fresh virtual environment and runs it."""

import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked(*paths):
    out = subprocess.run(["git", "ls-files", *paths], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout (e.g. an unpacked sdist)")
    return set(out.stdout.split())


def test_sdist_holds_every_tracked_source_and_header(tmp_path):
    tracked = _tracked("csrc", "CMakeLists.txt", "setup.py", "pyproject.toml", "aiayn")
    assert any(p.endswith(".h") for p in tracked) and any(p.endswith(".cuh") for p in tracked)
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "AIAYN_CUDA": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    (sdist,) = tmp_path.glob("aiayn-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted(p for p in tracked if p not in names and not p.endswith(".gitignore"))
    assert not missing, f"the sdist lacks {missing}"
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))], "build outputs leaked into the sdist"
