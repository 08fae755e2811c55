"""The slow-BLAS note: printed at a tool's start on the reference BLAS mlx[cpu] ships, not with
OpenBLAS preloaded."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import time_limit

from mlx_mla import blas

MAPS = "7f00-7f01 r-xp 0 08:01 1 /site-packages/mlx_cpu.libs/{}\n"
REFERENCE = "libblas-bd8a282c.so.3.10.0"
NUMPY_OWN = "libscipy_openblas64_-32a4b2a6.so"


def libraries(*names) -> set[str]:
    return blas.mapped_libraries("".join(MAPS.format(n) for n in names))


def test_the_reference_blas_alone_is_slow_even_beside_numpys_prefixed_openblas():
    assert blas.reference_blas(libraries(REFERENCE))
    assert blas.reference_blas(libraries(REFERENCE, NUMPY_OWN))


@pytest.mark.parametrize("fast", ["libopenblas.so.0", "libmkl_rt.so.2", "libblis.so.4"])
def test_a_preloaded_fast_blas_is_not_slow(fast):
    assert not blas.reference_blas(libraries(REFERENCE, fast))


def test_no_blas_loaded_says_nothing():
    assert not blas.reference_blas(libraries("libc.so.6"))


def tool_stderr(preload: str, terminal: bool = True) -> str:
    """What a tool writes to stderr, a terminal (a pseudo-terminal) or a pipe."""
    import pty
    import select

    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.QUIET_ENV)}
    env |= {"LD_PRELOAD": preload} if preload else {}
    reader, writer = pty.openpty() if terminal else os.pipe()
    result = subprocess.run(
        [sys.executable, "-m", "mlx_mla.memory", "--context", "4096"],
        stdout=subprocess.PIPE,
        stderr=writer,
        text=True,
        env=env,
        timeout=time_limit(10),
    )
    os.close(writer)
    chunks = []
    while select.select([reader], [], [], 1)[0]:
        try:
            chunk = os.read(reader, 65536)
        except OSError:  # a pseudo-terminal whose other end has closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(reader)
    assert result.returncode == 0
    return b"".join(chunks).decode()


@pytest.mark.skipif(sys.platform != "linux", reason="the note is for mlx[cpu] on Linux")
def test_a_tool_tells_a_terminal_of_the_reference_blas_and_not_with_openblas():
    import mlx.core as mx

    maps = Path("/proc/self/maps").read_text()
    if not blas.reference_blas(blas.mapped_libraries(maps)) and not os.environ.get("LD_PRELOAD"):
        pytest.skip("this mlx does not run on the reference BLAS")
    assert mx.default_device() == mx.cpu
    assert tool_stderr("").splitlines() == [blas.NOTE]
    assert tool_stderr("", terminal=False) == ""  # a script reading stderr gets no extra line
    if not Path(blas.OPENBLAS).exists():
        pytest.skip(f"{blas.OPENBLAS} is not installed")
    assert tool_stderr(blas.OPENBLAS) == ""
