"""Builds aiayn._C: the CPU kernels always, the CUDA kernels when nvcc and a CUDA build of torch
are there (AIAYN_CUDA=0|1 forces it). Package metadata lives in pyproject.toml.

    pip install --no-build-isolation -e .      # the build uses the torch already installed
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = re.search(r'^version\s*=\s*"([^"]+)"', open(os.path.join(ROOT, "pyproject.toml")).read(), re.M).group(1)
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100 and H100; override with TORCH_CUDA_ARCH_LIST


def log(msg):
    print(f"aiayn build: {msg}", file=sys.stderr, flush=True)


def find_cuda_home():
    """The CUDA toolkit that `nvcc` really runs from.

    torch guesses CUDA_HOME as the parent of the folder holding `nvcc`, which is wrong when `nvcc`
    is a wrapper script outside the toolkit. `nvcc --dryrun` prints the toolkit's own TOP folder.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if not nvcc:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
        if m:
            return os.path.realpath(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def pip_nvidia_dirs():
    """Headers and libraries of the pip `nvidia-*` packages (cuBLAS, cuSPARSE, ...) that come with
    a CUDA build of torch; a system toolkit may lack them."""
    incs, libs = [], []
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for base in sorted(glob.glob(os.path.join(site, "nvidia", "cu*"))) + [os.path.join(site, "nvidia")]:
            if os.path.isdir(os.path.join(base, "include")) and os.path.exists(os.path.join(base, "include", "cublas_v2.h")):
                incs.append(os.path.join(base, "include"))
            if glob.glob(os.path.join(base, "lib", "libcublasLt.so*")):
                libs.append(os.path.join(base, "lib"))
    return incs, libs


def cublaslt_library(lib_dirs):
    """The linker name of the cuBLASLt that torch loads (linear / feed_forward run on it): the pip
    packages often hold only the versioned file (libcublasLt.so.13), linked as -l:libcublasLt.so.13;
    its soname matches the one torch already loaded, so importing aiayn loads nothing new."""
    for d in lib_dirs:
        if os.path.exists(os.path.join(d, "libcublasLt.so")):
            return "cublasLt"
        versioned = sorted(glob.glob(os.path.join(d, "libcublasLt.so.*")), key=len)
        if versioned:
            return ":" + os.path.basename(versioned[0])
    return "cublasLt"  # the toolkit's, from CUDAExtension's library dirs


def cuda_decision(torch):
    want = os.environ.get("AIAYN_CUDA", "").strip().lower()
    if want in ("0", "false", "off", "no"):
        return False, "skipped because AIAYN_CUDA=0", None
    cuda_home = find_cuda_home()
    reason = None
    if torch.version.cuda is None:
        reason = f"skipped because torch {torch.__version__} is a CPU-only build"
    elif cuda_home is None:
        reason = "skipped because nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    if reason and want in ("1", "true", "on", "yes"):
        raise SystemExit(f"aiayn build: AIAYN_CUDA=1 but CUDA cannot be built: {reason}")
    return reason is None, reason, cuda_home


def main():
    import torch

    with_cuda, why_not, cuda_home = cuda_decision(torch)
    if with_cuda:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    from torch.utils import cpp_extension

    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home

    csrc = os.path.join("csrc")
    sources = [os.path.join(csrc, "aiayn.cpp")] + sorted(glob.glob(os.path.join(csrc, "cpu", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join(csrc, "cuda", "**", "*.cu"), recursive=True))
    defines = [
        "-DAIAYN_WITH_PYTHON",
        f'-DAIAYN_VERSION="{VERSION}"',
        f'-DAIAYN_TORCH_VERSION="{torch.__version__}"',
    ]
    # -ffp-contract=off: no FMA the source did not ask for (kernels call Vec::fma where they want
    # one), so every ISA variant and the forward/backward recomputations round identically.
    cxx = ["-O3", "-fopenmp", "-Wno-psabi", "-fno-math-errno", "-ffp-contract=off"] + defines
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DAIAYN_WITH_CUDA"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    library_dirs, libraries, link = [], [], ["-fopenmp"]
    sanitize = os.environ.get("AIAYN_SANITIZE", "").strip()
    if sanitize:
        # AIAYN_SANITIZE=address,undefined: the CPU kernels under ASan + UBSan (see
        # scripts/sanitize_check.sh for running them inside a normal Python). Every UBSan report is
        # fatal (-fno-sanitize-recover=all). The link flags pull in the shared runtimes, which a
        # normal python must LD_PRELOAD (ASan has to come first in the library list).
        flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g", "-fno-sanitize-recover=all"]
        cxx = [f for f in cxx if f != "-O3"] + ["-O1"] + flags
        link += flags
    if with_cuda:
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        cxx += ["-DAIAYN_WITH_CUDA", f'-DAIAYN_CUDA_ARCHS="{archs}"']
        incs, libs = pip_nvidia_dirs()
        include_dirs += incs
        library_dirs += libs
        libraries.append(cublaslt_library(libs))
        summary_cuda = f"CUDA {torch.version.cuda} from {cuda_home}, archs {archs}, {len(cuda_sources)} sources"
        ext = cpp_extension.CUDAExtension(
            "aiayn._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            libraries=libraries,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    else:
        summary_cuda = f"CUDA: {why_not}"
        ext = cpp_extension.CppExtension(
            "aiayn._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )

    class Build(cpp_extension.BuildExtension):
        def run(self):
            super().run()
            log(f"built aiayn._C {VERSION} for torch {torch.__version__}: CPU ISAs avx512(+bf16, +amx), avx2, generic "
                f"(chosen at run time), OpenMP on; {summary_cuda}" + (f"; sanitizers: {sanitize}" if sanitize else ""))

    setup(ext_modules=[ext], cmdclass={"build_ext": Build.with_options(use_ninja=True)})


main()
