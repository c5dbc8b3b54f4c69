#!/usr/bin/env bash
# Proves that a release builds and works away from the checkout, as a user gets it from an index:
#   1. build the source distribution (python -m build --sdist) and check it holds every file under
#      csrc/ that git tracks (the headers included);
#   2. in a fresh virtual environment outside the checkout, with a CPU-only torch (2.13.0: another
#      torch than the checkout's, as a user's may be), `pip wheel --no-build-isolation` the sdist
#      (the same path `pip install aiayn-X.tar.gz` takes) and install the wheel it gives;
#   3. from a folder outside the checkout: import aiayn, check the submodules the README uses, run
#      an op against its reference, run the `aiayn` command.
# Usage: scripts/package_check.sh [WORKDIR]   (default: a new temporary folder, removed at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=${1:-$(mktemp -d)}
[ -n "${1:-}" ] || trap 'rm -rf "$work"' EXIT
mkdir -p "$work"
export MAX_JOBS="${MAX_JOBS:-2}"
PY=${PYTHON:-python}
TORCH_SPEC=${AIAYN_PACKAGE_TORCH:-torch==2.13.0}

echo "package_check: building the sdist"
rm -rf "$work/dist"
$PY -m build --sdist --no-isolation --outdir "$work/dist" . > "$work/sdist.log" 2>&1 || { tail -30 "$work/sdist.log"; exit 1; }
sdist=$(ls "$work"/dist/aiayn-*.tar.gz)
echo "package_check: $sdist ($(du -k "$sdist" | cut -f1) KiB)"

# Every tracked source file of the extension must be in the sdist.
top=$(basename "$sdist" .tar.gz)
tar -tzf "$sdist" | sed -n "s|^$top/||p" | sort > "$work/in_sdist.txt"
git ls-files csrc CMakeLists.txt setup.py pyproject.toml | sort > "$work/tracked.txt"
missing=$(comm -23 "$work/tracked.txt" "$work/in_sdist.txt")
if [ -n "$missing" ]; then
  echo "package_check: the sdist lacks these tracked files:" >&2
  echo "$missing" >&2
  exit 1
fi
echo "package_check: the sdist holds all $(wc -l < "$work/tracked.txt") tracked csrc/ and build files"

echo "package_check: fresh virtual environment with $TORCH_SPEC"
rm -rf "$work/venv"
$PY -m venv "$work/venv"
V="$work/venv/bin"
{ "$V/python" -m pip install --upgrade pip && "$V/python" -m pip install "$TORCH_SPEC" numpy setuptools wheel ninja; } \
  > "$work/venv.log" 2>&1 || { tail -30 "$work/venv.log"; exit 1; }

echo "package_check: pip wheel of the sdist (compiles aiayn._C against that torch)"
cd "$work"
t0=$(date +%s)
"$V/python" -m pip wheel --no-build-isolation --no-deps -w "$work/wheels" "$sdist" > "$work/wheel.log" 2>&1 \
  || { tail -40 "$work/wheel.log"; exit 1; }
wheel=$(ls "$work"/wheels/aiayn-*.whl)
echo "package_check: built $(basename "$wheel") in $(( $(date +%s) - t0 )) s"
"$V/python" -m pip install "$wheel" > "$work/install.log" 2>&1 || { tail -30 "$work/install.log"; exit 1; }

echo "package_check: import and run from $work (outside the checkout)"
"$V/python" - "$repo" <<'PY'
import os, sys
import torch
import aiayn
repo = sys.argv[1]
assert not os.path.realpath(aiayn.__file__).startswith(os.path.realpath(repo) + os.sep), aiayn.__file__
from aiayn import functional as AF, reference
x, res = torch.randn(3, 7, 40), torch.randn(3, 7, 40)
w, b = torch.randn(40), torch.randn(40)
got = AF.add_dropout_layer_norm(x, res, w, b, p=0.0)
want = reference.add_dropout_layer_norm(x.double(), res.double(), w.double(), b.double(), p=0.0)
err = (got.double() - want).abs().max().item()
assert err < 1e-4, err
for name in ("nn", "functional", "interop", "train", "data", "decoding", "bench", "reference", "translate"):
    getattr(aiayn, name)
info = aiayn.build_info()
print(f"package_check: aiayn {aiayn.__version__} from {os.path.dirname(aiayn.__file__)}, torch {torch.__version__}, "
      f"CPU ISA {info['cpu_isa']}, CUDA {bool(info['cuda'])}; add_dropout_layer_norm max error {err:.1e}")
PY
"$V/aiayn" info > /dev/null
echo "package_check: OK"
