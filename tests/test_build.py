"""What the build reports and how the CPU ISA is chosen (runtime dispatch, AIAYN_CPU_ISA)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import aiayn


def test_build_info_fields():
    info = aiayn.build_info()
    assert info["version"] == aiayn.__version__
    assert info["torch_version"] == torch.__version__
    assert info["cpu_isas_compiled"] == ["avx512", "avx2", "generic"]
    assert info["cpu_isa"] in info["cpu_isas_supported"]
    assert info["amx_compiled"] or not info["amx_bf16"]
    assert info["openmp_threads"] >= 1
    assert "OpenMP" in info["parallel_backend"]
    if torch.version.cuda is not None and os.environ.get("AIAYN_CUDA") != "0":
        assert info["cuda"], "a CUDA build of torch with nvcc present should build the CUDA kernels"
        assert "8.0" in info["cuda_archs"] or info["cuda_archs"]


def run_python(code, **env):
    full_env = dict(os.environ, **env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_best_isa_selected_by_default():
    expected = aiayn.build_info()["cpu_isas_supported"][0]
    env = {k: v for k, v in os.environ.items() if k != "AIAYN_CPU_ISA"}
    out = subprocess.run([sys.executable, "-c", "import aiayn; print(aiayn.build_info()['cpu_isa'])"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == expected


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_env_var_lowers_isa(isa):
    if not aiayn._C.cpu_isa_supported(isa):
        pytest.skip(f"{isa} not supported on this CPU")
    assert run_python("import aiayn; print(aiayn.build_info()['cpu_isa'])", AIAYN_CPU_ISA=isa) == isa


@pytest.mark.parametrize("mode", ["widened", "dot", "amx"])
def test_env_var_sets_bf16_gemm_mode(mode):
    """AIAYN_BF16_GEMM forces the bf16 GEMM mode of the AVX-512 kernels (amx only where the CPU and
    OS allow it, else the automatic choice); below AVX-512 bf16 is always widened."""
    if not aiayn._C.cpu_isa_supported("avx512"):
        pytest.skip("the bf16 GEMM modes are AVX-512 only")
    code = "import aiayn; print(aiayn._C.gemm_bf16())"
    got = run_python(code, AIAYN_BF16_GEMM=mode)
    if mode == "amx" and not aiayn._C.amx_supported():
        assert got in ("vdpbf16ps", "widened to float32")
    else:
        assert got == {"widened": "widened to float32", "dot": "vdpbf16ps", "amx": "amx"}[mode]
    assert run_python(code, AIAYN_BF16_GEMM=mode, AIAYN_CPU_ISA="avx2") == "widened to float32"
    default = run_python(code)
    if aiayn._C.amx_supported():
        assert default == "amx"
    else:
        assert default in ("vdpbf16ps", "widened to float32")


def test_cpu_isa_context_manager_restores():
    before = aiayn._C.cpu_isa()
    with aiayn.cpu_isa("generic"):
        assert aiayn._C.cpu_isa() == "generic"
    assert aiayn._C.cpu_isa() == before
    with pytest.raises(ValueError, match="unknown CPU ISA"):
        with aiayn.cpu_isa("sse9"):
            pass


def test_cli_info():
    out = subprocess.run([sys.executable, "-m", "aiayn", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["version"] == aiayn.__version__


def test_parallel_for_really_runs_in_parallel():
    # Without -fopenmp the `#pragma omp parallel` inside at::parallel_for (an inline header) is
    # silently ignored and every kernel runs on one thread: the library must call into libgomp.
    with open(aiayn._C.__file__, "rb") as f:
        assert b"GOMP_parallel" in f.read(), "aiayn._C was compiled without OpenMP"
    assert aiayn.build_info()["openmp_threads"] == torch.get_num_threads()
