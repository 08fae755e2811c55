"""Importing mlx_mla has no side effects: no signal handler, no patched dependency (our cache
classes are given to mlx-lm's prompt-cache loader only when a file is loaded), no argument
parsing."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import time_limit

from mlx_mla import memory

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


CALCULATOR_PROBE = """
import signal, sys
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGHUP)
handlers = {s: signal.getsignal(s) for s in SIGNALS}
import mlx_mla.memory, mlx_mla.distributed.stages
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm", "numpy", "torch"))
changed = [s.name for s in SIGNALS if signal.getsignal(s) is not handlers[s]]
print(heavy, changed)
"""


def test_the_calculator_and_the_planner_import_without_mlx_and_set_no_handler():
    result = subprocess.run(
        [sys.executable, "-c", CALCULATOR_PROBE],
        capture_output=True,
        text=True,
        timeout=time_limit(5),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] []"


def test_the_calculator_computes_nothing_at_import_its_presets_are_data():
    """memory.py's top level holds imports, definitions and assignments of literals: no loop that
    edits the presets, no claims computed (calls, other than of a decorator, are refused)."""
    tree = ast.parse(Path(memory.__file__).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        assert isinstance(node, ast.Assign), ast.unparse(node)
        assert all(isinstance(t, ast.Name) for t in node.targets), ast.unparse(node)
        calls = [n for n in ast.walk(node.value) if isinstance(n, ast.Call)]
        assert calls == [], ast.unparse(node)
    assert not hasattr(memory, "CLAIMS")
    assert [c.description for c in memory.claims()] == [c.description for c in memory.claims()]
