"""The module graph of mlx_mla, read from the source with `ast`: no import cycle, no import of a
module in a higher layer, and signals named in startup.py alone. docs/architecture.md draws it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_mla"

# Lowest first; a module may import its own layer's and lower layers' modules. The caches' storage
# sits below the model, which builds one per layer (`Model.make_cache`), as in mlx-lm; the files
# that save caches with a model's description sit above it.
LAYERS = [
    ["mlx_mla", "errors", "defaults", "startup", "blas", "model.families"],  # pure Python
    ["model.config", "distributed.stages"],  # config.json read, the planner (pure Python)
    ["cache.storage"],
    ["cache.batch"],
    ["cache.latent"],
    ["model.attention", "model.indexer", "model.moe", "model.decoder", "model.loading"],
    ["speculative"],
    ["cache.prompt_cache", "cache.conversations"],  # with the drafter's state beside the cache
    ["speculative_batch"],
    ["cli"],  # what the tools share
    ["memory", "fit"],  # the calculator (also a tool) and the fit check
    ["distributed.pipeline"],
    ["generate", "perplexity", "convert", "cache_prompt"],
    ["web"],  # the chat page and its endpoints
    ["chat", "server"],
]


def module_name(path: Path) -> str:
    parts = path.with_suffix("").relative_to(PACKAGE).parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts) or "mlx_mla"


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports, anywhere in it (a function's import counts too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    package = "" if package == "mlx_mla" else package  # names are relative to the package
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package else []
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}".strip(".") for a in node.names]
            found |= {n if n in known else target or "mlx_mla" for n in names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlx_mla"):
            target = node.module.removeprefix("mlx_mla").strip(".") or "mlx_mla"
            names = [f"{target}.{a.name}".removeprefix("mlx_mla.") for a in node.names]
            found |= {n if n in known else target for n in names}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mlx_mla"):
                    found.add(alias.name.removeprefix("mlx_mla").strip(".") or "mlx_mla")
    return found - {name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def layer_of(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    packages = {"cache", "model", "distributed"}  # their __init__ import nothing
    return 0 if name in packages else -1


def test_every_module_has_a_layer():
    assert [name for name in modules() if layer_of(name) < 0] == []


def upward(edges: dict[str, set[str]]) -> list[str]:
    return [
        f"{name} ({layer_of(name)}) imports {dep} ({layer_of(dep)})"
        for name, deps in edges.items()
        for dep in sorted(deps)
        if layer_of(dep) > layer_of(name)
    ]


def test_no_module_imports_one_of_a_higher_layer():
    assert upward(graph()) == []


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle_and_an_upward_import():
    """The checks above can fail: a planted cycle and a planted upward import are found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert upward({"errors": {"chat"}, "chat": {"errors"}}) == [
        f"errors (0) imports chat ({layer_of('chat')})"
    ]
    assert imports(PACKAGE / "memory.py", set(modules())) >= {"cli", "errors", "model.families"}
    assert imports(PACKAGE / "__init__.py", set(modules())) == {"errors", "startup"}


def test_only_startup_names_signals():
    """Every signal handler is set in startup.py."""
    naming = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "signal" for a in node.names):
                naming.append(name)
            elif isinstance(node, ast.ImportFrom) and node.module == "signal":
                naming.append(name)
    assert naming == ["startup"]
