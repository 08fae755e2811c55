"""Errors a user can act on. The CLIs print their message on one line and exit with code 2."""


class MLAError(Exception):
    """Base class for every error mlx_mla raises on bad input."""


class ConfigError(MLAError):
    """config.json is missing, unreadable or describes something we cannot run."""


class UnsupportedModelError(ConfigError):
    """config.json names a model_type we do not implement."""


class CheckpointError(MLAError):
    """Weights are missing, unreadable, unexpected or of the wrong shape."""


class BadArgumentError(MLAError, ValueError):
    """A function was called with a value it cannot mean (a negative temperature, a None path)."""


class ContextError(MLAError):
    """The prompt does not fit the model's context."""
