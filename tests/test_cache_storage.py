"""Every cache class owns its storage: `slots()` and `resize()` cut and grow all of its arrays (the
index keys of DSA's too) and keep what it holds; the classes reach mlx-lm's prompt-cache loader
only through `register_with_mlx_lm`, and every one round-trips a file with it."""

import ast
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from mlx_mla.cache.latent import (
    CACHES,
    ExpandedKVCache,
    IndexedKVCache,
    IndexedLatentCache,
    LatentCache,
    register_with_mlx_lm,
)

CACHE_DIR = Path(__file__).resolve().parents[1] / "mlx_mla" / "cache"
TOKENS = 300  # past one 256-token step of storage
GROUP = 32


def filled(kind: type, quantized: bool):
    """A cache of `kind` holding TOKENS tokens (random latent / K-V, and index keys for DSA's),
    quantised in groups of 32 with 8 bits if asked."""
    mx.random.seed(0)
    cache = kind()
    if issubclass(kind, LatentCache):
        shapes = (1, 1, TOKENS, 64), (1, 1, TOKENS, 16)  # c_kv, k_pe
    else:
        shapes = (1, 2, TOKENS, 64), (1, 2, TOKENS, 32)  # keys, values
    cache.update_and_fetch(*(mx.random.normal(s) for s in shapes))
    if kind in (IndexedLatentCache, IndexedKVCache):
        cache.update_index(mx.random.normal((1, 1, TOKENS, 32)))
    return cache.to_quantized(group_size=GROUP, bits=8) if quantized else cache


KINDS = {
    f"{kind.__name__}{' quantised' if q else ''}": (kind, q)
    for kind in (LatentCache, ExpandedKVCache, IndexedLatentCache, IndexedKVCache)
    for q in (False, True)
}


def arrays(cache) -> list[np.ndarray]:
    """What the cache holds, its first `offset` slots of every array, as mlx-lm saves it."""
    found = []

    def walk(x):
        if isinstance(x, (list, tuple)):
            for a in x:
                walk(a)
        elif isinstance(x, mx.array) and x.ndim == 4:
            found.append(np.array(x[:, :, : cache.offset]))

    walk(cache.state)
    return found


def test_the_cases_cover_every_cache_class():
    assert {type(filled(*k)) for k in KINDS.values()} == set(CACHES)


@pytest.mark.parametrize("kind", KINDS.values(), ids=KINDS.keys())
def test_resize_cuts_and_grows_every_array_and_keeps_what_the_cache_holds(kind):
    cache = filled(*kind)
    held = arrays(cache)
    assert cache.slots() == 512  # grown 256 at a time
    nbytes = cache.nbytes
    cache.trim(TOKENS - 200)
    cache.resize(256)
    assert cache.slots() == 256 and cache.offset == 200 and cache.nbytes == nbytes // 2
    assert all(np.array_equal(a, b[:, :, :200]) for a, b in zip(arrays(cache), held, strict=True))
    cache.resize(512)
    assert cache.slots() == 512 and cache.nbytes == nbytes and cache.offset == 200
    assert all(np.array_equal(a, b[:, :, :200]) for a, b in zip(arrays(cache), held, strict=True))


@pytest.mark.parametrize("kind", KINDS.values(), ids=KINDS.keys())
def test_every_cache_class_round_trips_a_prompt_cache_file_once_registered(kind, tmp_path):
    cache = filled(*kind)
    file = str(tmp_path / "cache.safetensors")
    save_prompt_cache(file, [cache])
    register_with_mlx_lm()
    (loaded,) = load_prompt_cache(file)
    assert type(loaded) is type(cache) and loaded.offset == cache.offset
    assert loaded.nbytes == cache.nbytes
    assert all(np.array_equal(a, b) for a, b in zip(arrays(loaded), arrays(cache), strict=True))


def test_the_cache_modules_import_no_module_that_imports_them():
    graph = {}
    for file in CACHE_DIR.glob("*.py"):
        tree = ast.parse(file.read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1]
        graph[file.stem] = {
            name.split(".")[0]
            for node in imports
            for name in ([node.module] if node.module else [a.name for a in node.names])
        }

    def reaches(start, target, seen=()):
        return any(
            n == target or (n not in seen and reaches(n, target, (*seen, n)))
            for n in graph.get(start, ())
        )

    assert [m for m in graph if reaches(m, m)] == []
