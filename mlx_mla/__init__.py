"""DeepSeek Multi-head Latent Attention for MLX, with a latent KV cache."""

from . import startup  # noqa: F401  first: a tool's Ctrl-C is quiet during the slow imports below
from .cache.latent import LatentCache, QuantizationError, QuantizedLatentCache
from .errors import (
    BadArgumentError,
    CheckpointError,
    ConfigError,
    ContextError,
    MLAError,
    UnsupportedModelError,
)
from .model.config import ModelArgs
from .model.decoder import Model
from .model.loading import load, load_model

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
        from importlib import import_module

        return import_module(".convert", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
