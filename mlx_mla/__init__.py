"""DeepSeek Multi-head Latent Attention for MLX, with a latent KV cache."""

from .cache import LatentCache, QuantizationError, QuantizedLatentCache
from .config import ModelArgs
from .errors import CheckpointError, ConfigError, MLAError, UnsupportedModelError
from .loading import load, load_model
from .model import Model

__all__ = [
    "CheckpointError",
    "ConfigError",
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
