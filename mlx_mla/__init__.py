"""DeepSeek Multi-head Latent Attention for MLX, with a latent KV cache."""

from .cache import LatentCache
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
    "UnsupportedModelError",
    "load",
    "load_model",
]
