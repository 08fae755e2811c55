"""Which BLAS MLX's CPU backend multiplies matrices with on Linux. `mlx[cpu]` ships the reference
BLAS (netlib), which is many times slower than OpenBLAS; preloading OpenBLAS replaces it."""

import os
import sys
from pathlib import Path

FAST = ("openblas", "mkl", "blis", "flexiblas")
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
QUIET_ENV = "MLX_MLA_NO_BLAS_NOTE"
# docs/usage.md, "Slow BLAS on Linux": a 1024x1024 float32 matmul, measured beside OpenBLAS.
NOTE = (
    "note: MLX is running on the reference BLAS that mlx[cpu] ships, about 20x slower at "
    "matrix products than OpenBLAS; for the fast path: apt install libopenblas0-pthread, then "
    f"run with LD_PRELOAD={OPENBLAS} ({QUIET_ENV}=1 hides this note)"
)


def mapped_libraries(maps: str) -> set[str]:
    """File names of the shared objects in a /proc/PID/maps listing."""
    return {Path(line.split()[-1]).name for line in maps.splitlines() if ".so" in line}


def reference_blas(libraries: set[str]) -> bool:
    """Whether the BLAS in use is the reference one: a libblas is loaded and no fast BLAS is."""
    # numpy's libscipy_openblas prefixes its symbols (scipy_sgemm_): MLX cannot use it.
    names = [name.lower() for name in libraries if "scipy_" not in name]
    if any(fast in name for name in names for fast in FAST):
        return False
    return any(name.startswith("libblas") for name in names)


def slow_blas_note() -> str | None:
    """The note to print at a tool's start, or None (not Linux, a fast BLAS, or asked not to)."""
    if sys.platform != "linux" or os.environ.get(QUIET_ENV):
        return None
    import mlx.core as mx  # loads libmlx and the BLAS it links

    if mx.default_device() != mx.cpu:
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return NOTE if reference_blas(mapped_libraries(maps)) else None
