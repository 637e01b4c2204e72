"""The exceptions ffkv_lens raises.

Every message says what went wrong, the value received and how to fix it.

Example:
    >>> from ffkv_lens.errors import FfkvLensError, UnsupportedArchitectureError
    >>> issubclass(UnsupportedArchitectureError, FfkvLensError)
    True
"""

__all__ = [
    "ConfigError",
    "FfkvLensError",
    "HookNotFiredError",
    "ModelNotAvailableError",
    "ModelConversionError",
    "UnsupportedArchitectureError",
]


class FfkvLensError(Exception):
    """Base class of every error raised on purpose by ffkv_lens."""


class ConfigError(FfkvLensError, ValueError):
    """An argument or setting has a value that is not allowed."""


class ModelNotAvailableError(FfkvLensError):
    """A model cannot be found: its package is not installed or the path does not exist."""


class ModelConversionError(FfkvLensError):
    """Turning an embedded GGUF file into a Hugging Face folder failed."""


class UnsupportedArchitectureError(FfkvLensError):
    """No adapter is registered for the model's architecture."""


class HookNotFiredError(FfkvLensError):
    """A hook the adapters rely on did not fire during a forward pass."""
