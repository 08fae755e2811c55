"""DeepSeek Multi-head Latent Attention for MLX, with a latent KV cache."""

from importlib import import_module

from . import startup  # noqa: F401  first: a tool's Ctrl-C is quiet during the slow imports below
from .errors import (
    BadArgumentError,
    CheckpointError,
    ConfigError,
    ContextError,
    MLAError,
    UnsupportedModelError,
)

# Imported when first named, so that the calculator (mlx_mla.memory) runs without MLX.
LAZY = {
    "LatentCache": ".cache.latent",
    "QuantizationError": ".cache.latent",
    "QuantizedLatentCache": ".cache.latent",
    "ModelArgs": ".model.config",
    "Model": ".model.decoder",
    "load": ".model.loading",
    "load_model": ".model.loading",
}

__all__ = [
    "BadArgumentError",
    "CheckpointError",
    "ConfigError",
    "ContextError",
    "LatentCache",
    "MLAError",
    "Model",
    "ModelArgs",
    "QuantizationError",
    "QuantizedLatentCache",
    "UnsupportedModelError",
    "load",
    "load_model",
]


def __getattr__(name):
    # `mlx_mla.convert(...)` converts; importing the module lazily keeps `python -m mlx_mla.convert`
    # free of runpy's double-import warning.
    if name == "convert":
        return import_module(".convert", __name__)
    if name in LAZY:
        return getattr(import_module(LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
