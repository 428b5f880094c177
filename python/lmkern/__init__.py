"""lmkern: fused numeric kernels from recent language-model papers, as torch custom ops.

The kernels live in Rust (lmkern._core): CPU on torch's OpenMP threads or a rayon pool, CUDA
through cudarc; this package registers them with torch (torch.ops.lmkern.*) and exposes the public
functions below.
"""
from __future__ import annotations

import numbers
import os
import sys
import warnings

import torch

from . import _core
from . import ops  # noqa: F401  (registers torch.ops.lmkern.*)
from . import nn
from . import convert, models  # Pre-LN -> Pre-(C)RMSNorm conversion, lmkern's own small Transformer
from . import ncd  # gzip-NCD / ZIP-FIT scoring: lmkern.ncd.*
from . import data  # ZIP-FIT selection (pyarrow, Ray imported when used; not in __all__: `data` is a common name)
from . import quant
from .ops.norm import crms_norm, crms_norm_, rms_norm, rms_norm_

# Leaves of torch.fx.symbolic_trace (their argument checks cannot run on fx's symbolic values): a
# call spelled lmkern.rms_norm(...) in traced code is recorded as one call (fx patches this module's
# names while it traces; a name imported from here beforehand is not patched).
for _name in ("rms_norm", "crms_norm", "rms_norm_", "crms_norm_"):
    torch.fx.wrap(_name)

__all__ = [
    "rms_norm", "crms_norm", "rms_norm_", "crms_norm_", "nn", "convert", "models", "ncd", "quant",
    "cuda_available", "cuda_status", "cpu_isa", "cpu_pool", "set_num_threads", "get_num_threads", "MAX_THREADS",
]

try:
    from importlib.metadata import version as _version

    __version__ = _version("lmkern")
except Exception:  # not installed as a distribution (e.g. a source tree on sys.path)
    __version__ = "0+unknown"


def cuda_status() -> str | None:
    """None when lmkern's CUDA kernels can run here, else why not."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return _core.cuda_status()


def cuda_available() -> bool:
    """Whether lmkern's CUDA path works here (kernels built in, driver loaded, a device present)."""
    return cuda_status() is None


def cpu_isa() -> str:
    """The instruction set lmkern's CPU kernels use: "baseline", "avx2" or "avx512" (where a kernel has
    such a version), the widest this CPU has, capped by the environment variable LMKERN_CPU_ISA
    (read once per process)."""
    return _core.cpu_isa()


_isa_cap = os.environ.get("LMKERN_CPU_ISA")
if _isa_cap is not None and _isa_cap.strip().lower() not in ("baseline", "avx2", "avx512"):
    # (the Rust core ignores a value it does not know: say so rather than run uncapped silently)
    warnings.warn(f"LMKERN_CPU_ISA={_isa_cap!r} is not one of 'baseline', 'avx2', 'avx512': ignored "
                  f"(lmkern.cpu_isa() = {cpu_isa()!r})", RuntimeWarning, stacklevel=2)


#: The most threads set_num_threads takes: the pool starts them all at once (100,000 took minutes).
MAX_THREADS = 4096


def set_num_threads(threads: int) -> None:
    """Set the number of CPU threads lmkern's kernels use (default: torch.get_num_threads() at import),
    1 to MAX_THREADS."""
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
        raise TypeError(f"threads: expected an int; got {type(threads).__name__} {threads!r}")
    if not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads: expected a count from 1 to {MAX_THREADS}; got {threads}")
    _core.set_num_threads(int(threads))


def get_num_threads() -> int:
    """The number of CPU threads lmkern's kernels use."""
    return _core.get_num_threads()


def _torch_openmp_runtime() -> str | None:
    """The path of the OpenMP runtime torch's CPU ops run on, from the libraries this process has
    loaded (Linux): the one in torch's own package (pip wheels), else the only one loaded (a conda
    environment's); None where that is not clear or torch has no OpenMP."""
    if not sys.platform.startswith("linux") or not torch.backends.openmp.is_available():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {fields[5].strip() for fields in (line.split(None, 5) for line in maps) if len(fields) == 6}
    except OSError:
        return None
    runtimes = sorted(p for p in paths if p.startswith("/") and os.path.basename(p).startswith(("libgomp", "libiomp5", "libomp"))
                      and ".so" in os.path.basename(p))
    torch_dir = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    torchs = [p for p in runtimes if p.startswith((os.path.join(torch_dir, "torch") + os.sep,
                                                    os.path.join(torch_dir, "torch.libs") + os.sep))]
    if len(torchs) == 1:
        return torchs[0]
    return runtimes[0] if len(runtimes) == 1 else None


def _share_torch_openmp() -> None:
    """LMKERN_CPU_POOL=openmp (the default): the CPU kernels run on torch's OpenMP threads where
    found; =own: on lmkern's own pool."""
    choice = os.environ.get("LMKERN_CPU_POOL", "openmp").strip().lower()
    if choice == "own":
        return
    if choice != "openmp":
        warnings.warn(f"LMKERN_CPU_POOL={choice!r} is not 'openmp' or 'own': ignored (openmp)", RuntimeWarning,
                      stacklevel=3)
    path = _torch_openmp_runtime()
    if path is not None:
        try:
            _core.share_openmp_runtime(path)
        except RuntimeError as e:
            warnings.warn(f"torch's OpenMP runtime could not be shared ({e}); lmkern's own thread pool runs the "
                          "CPU kernels", RuntimeWarning, stacklevel=3)


def cpu_pool() -> str:
    """Whose threads run lmkern's CPU kernels: "openmp:<path>" (the OpenMP runtime torch's CPU ops
    run on, shared so that the two do not fight over the cores; the default on Linux) or "lmkern"
    (its own pool: elsewhere, in a forked child, or with LMKERN_CPU_POOL=own)."""
    path = _core.shared_openmp_runtime()
    return "lmkern" if path is None else f"openmp:{path}"


_share_torch_openmp()
_core.set_num_threads(min(torch.get_num_threads(), MAX_THREADS))
