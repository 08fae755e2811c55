"""Importing mlx_mla has no side effects: no signal handler, no patched dependency (our cache
classes are given to mlx-lm's prompt-cache loader only when a file is loaded), no argument
parsing."""

import subprocess
import sys

from conftest import time_limit

PROBE = """
import signal, sys
import mlx_lm.models.cache as mlx_lm_cache
import mlx_lm.generate, mlx_lm.server
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGHUP)
handlers = {s: signal.getsignal(s) for s in SIGNALS}
names = {m: set(vars(sys.modules[m])) for m in ("mlx_lm.models.cache", "mlx_lm.generate",
    "mlx_lm.server")}
sys.argv = ["a-program", "--not-a-flag-of-ours"]
import mlx_mla, mlx_mla.generate, mlx_mla.chat, mlx_mla.server, mlx_mla.convert, mlx_mla.memory
import mlx_mla.perplexity, mlx_mla.cache_prompt, mlx_mla.fit, mlx_mla.blas
changed = [s.name for s in SIGNALS if signal.getsignal(s) is not handlers[s]]
added = {m: sorted(set(vars(sys.modules[m])) - before) for m, before in names.items()}
print(changed, added)
"""


def test_importing_every_module_installs_no_handler_and_patches_nothing():
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=time_limit(10)
    )
    assert result.returncode == 0, result.stderr
    changed, added = result.stdout.strip().split(" ", 1)
    assert changed == "[]"
    assert added == str({"mlx_lm.models.cache": [], "mlx_lm.generate": [], "mlx_lm.server": []})
