"""Ctrl-C while a tool is still importing (seconds): exit quietly with 130; cli.run takes over
once the tool's main starts. Imported first by the package; a program importing mlx_mla keeps
Python's handler: only `python -m mlx_mla.<tool>`, the `mlx_mla.<tool>` scripts and the project's
convert.py get this one."""

import os
import signal
import sys
from pathlib import Path

EXIT_INTERRUPTED = 128 + signal.SIGINT
# Tests: "imports" or "main" has a tool say `awaiting Ctrl-C` on stdout and wait for it, where its
# imports begin or where cli.run takes over, so that a test sends it there and not after a guess.
AWAIT_CTRL_C_ENV = "MLX_MLA_AWAIT_CTRL_C"


def exit_interrupted(signum, frame):
    os._exit(EXIT_INTERRUPTED)


def launched_as_tool() -> bool:
    launcher = sys.argv[0] if sys.argv else ""
    return (
        launcher == "-m"  # `python -m mlx_mla.<tool>` while the package is imported
        or Path(launcher).name.startswith("mlx_mla.")
        or Path(launcher).resolve() == Path(__file__).resolve().parent.parent / "convert.py"
    )


def await_ctrl_c(where: str):
    if os.environ.get(AWAIT_CTRL_C_ENV) == where:
        os.write(sys.stdout.fileno(), b"awaiting Ctrl-C\n")
        signal.pause()


if launched_as_tool() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, exit_interrupted)
    await_ctrl_c("imports")
