"""aiayn: the Transformer of "Attention Is All You Need" (Vaswani et al., 2017) on hand-written
CPU (AVX-512 / AVX2) and CUDA kernels, registered with the PyTorch dispatcher.

    import aiayn
    aiayn.build_info()                       # what was compiled, which CPU ISA runs
    aiayn.functional.add_dropout_layer_norm(x, residual, weight, bias, p=0.1)
"""

import torch  # noqa: F401  (the extension links against the torch already loaded)

__version__ = "0.1.0"

_REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps -e ."


def _load_extension():
    try:
        from . import _C
    except ImportError as e:
        msg = str(e)
        if "undefined symbol" in msg:
            why = (f"aiayn._C does not match the installed torch {torch.__version__} (undefined symbol: it was "
                   "built against another torch version or ABI)")
        else:
            why = "the compiled extension aiayn._C is missing (the package was not built, or was built elsewhere)"
        raise ImportError(f"{why}.\n  Rebuild it from the source checkout with:\n    {_REBUILD}\n"
                          f"  (original error: {msg})") from e
    built = _C.build_info()["torch_version"]
    if built != torch.__version__:
        raise ImportError(f"aiayn._C was built against torch {built} but torch {torch.__version__} is installed.\n"
                          f"  Rebuild it from the source checkout with:\n    {_REBUILD}")
    return _C


_C = _load_extension()

from . import _ops  # noqa: E402,F401  (fake kernels and autograd of the registered ops)
from . import functional, reference  # noqa: E402,F401
from . import nn  # noqa: E402,F401  (the Transformer modules)
from ._ops import cpu_isa, packed_weight_cache  # noqa: E402

# The submodules a user reaches as `aiayn.<name>` after a bare `import aiayn`. The core ones are
# imported above; the rest load on first attribute access (PEP 562), so `import aiayn` does not pay
# for sentencepiece, sacrebleu or matplotlib until a program uses them.
_LAZY_SUBMODULES = ("bench", "cli", "data", "decoding", "demo", "errors", "evaluate", "export", "interop",
                    "quantization", "train", "translate")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")  # the import binds it: later look-ups skip this
    if name == "quantize":  # aiayn.quantize(model, "bf16"): the function, from aiayn.quantization
        from .quantization import quantize

        return quantize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES) | {"quantize"})


def build_info():
    """What this build contains: version, the torch it was built against, CPU ISA variants compiled
    and the one selected (AIAYN_CPU_ISA=avx2|generic lowers it), CUDA archs, OpenMP threads."""
    return _C.build_info()


__all__ = ["build_info", "cpu_isa", "packed_weight_cache", "functional", "nn", "reference", "quantize",
           "__version__", *_LAZY_SUBMODULES]
