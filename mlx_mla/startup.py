"""Every signal handler of the tools, in this one module: nothing else in the package sets one.

At import: Ctrl-C while a tool is still importing (seconds) exits quietly with 130; `cli.run` takes
over once the tool's main starts (`restore_interrupt`). Imported first by the package; a program
importing mlx_mla keeps Python's handler: only `python -m mlx_mla.<tool>`, the `mlx_mla.<tool>`
scripts and the project's convert.py get this one. The functions below are called by the tools'
mains, never at import."""

import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
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


def restore_interrupt():
    """Ctrl-C raises KeyboardInterrupt again (the tool's main handles it), if this module's
    import-time handler is the one installed."""
    if signal.getsignal(signal.SIGINT) is exit_interrupted:
        await_ctrl_c("main")
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextmanager
def on_interrupt(handler):
    """Ctrl-C calls `handler()` instead of raising, until the block ends (chat: stop a reply)."""
    previous = signal.signal(signal.SIGINT, lambda signum, frame: handler())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def ignore_interrupt():
    """Ctrl-C is not this process's to act on (a server's follower rank: rank 0 ends them all)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def interrupt_on_terminate():
    """SIGTERM raises KeyboardInterrupt, so a tool ends by the path Ctrl-C takes."""

    def terminated(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)


def exit_on_terminate():
    """SIGTERM exits with 143 through SystemExit, so `finally` blocks (a convert's clean-up) run."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(EXIT_TERMINATED))


def wake_on_terminate(fd: int):
    """SIGTERM writes its number to the socket `fd` (set_wakeup_fd) instead of ending the process:
    a thread reading it acts while the main thread is blocked in an MLX collective, where Python
    handlers never run. `terminated_in(data)` says whether what was read holds it."""
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.set_wakeup_fd(fd)


def terminated_in(data: bytes) -> bool:
    return signal.SIGTERM in data


def await_ctrl_c(where: str):
    if os.environ.get(AWAIT_CTRL_C_ENV) == where:
        os.write(sys.stdout.fileno(), b"awaiting Ctrl-C\n")
        signal.pause()


if launched_as_tool() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, exit_interrupted)
    await_ctrl_c("imports")
