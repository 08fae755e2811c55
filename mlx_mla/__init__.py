"""DeepSeek Multi-head Latent Attention for MLX, with a latent KV cache."""

from . import startup  # noqa: F401  first: a tool's Ctrl-C is quiet during the slow imports below
from .cache import LatentCache, QuantizationError, QuantizedLatentCache
from .config import ModelArgs
from .errors import (
    BadArgumentError,
    CheckpointError,
    ConfigError,
    ContextError,
    MLAError,
    UnsupportedModelError,
)
from .loading import load, load_model
from .model import Model

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
