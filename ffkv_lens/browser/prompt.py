"""The browser's Prompt page: one model, loaded once, traced and generated under memory edits.

A :class:`PromptModel` holds a :class:`~ffkv_lens.lens.MemoryLens` and answers the two POST routes
of the server (:data:`PROMPT_ROUTES`), each a JSON object in and out:

- ``/api/prompt/trace``: ``{"text", "edits": [Edit.to_dict(), ...], "top"}`` -> the trace of the
  prompt's last position without edits (``base``), under the edits (``edited``, ``null`` without
  edits) and their :meth:`~ffkv_lens.analysis.interventions.Trace.diff` (``diff``).
- ``/api/prompt/generate``: ``{"text", "edits", "max_new_tokens"}`` -> the greedy continuation
  without and with the edits.

Requests run one at a time (a lock: the model's hooks and weights are shared). The prompt's length
in tokens, the generation length, the number of edits and ``top`` are bounded by :class:`PromptLimits`,
and a prompt (with what it generates) by the model's context length, counted before the
tokenizer's truncation; a request past a bound, or with a bad field, raises
:class:`~ffkv_lens.errors.ConfigError` (HTTP 400) naming the value and the bound. The base trace
of a prompt is kept (the model does not change), so "edit + re-run" costs one traced forward pass.

Example:
    >>> prompt = PromptModel.load("smollm2-135m", device="cpu")  # doctest: +SKIP
    >>> prompt.trace({"text": "The capital of France is", "edits": [{"layer": 20, "keys": [7]}]})  # doctest: +SKIP
"""

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ffkv_lens.analysis.interventions import Edit, Trace, validate_edits
from ffkv_lens.errors import ConfigError
from ffkv_lens.lens import MemoryLens

__all__ = ["PROMPT_ROUTES", "PromptLimits", "PromptModel"]

BASE_CACHE = 16  # base traces kept (prompt, top)


@dataclass(frozen=True)
class PromptLimits:
    """Bounds of one Prompt-page request.

    Attributes:
        max_prompt_tokens: Tokens of a prompt (BOS included where the model prepends it).
        max_new_tokens: Tokens one generation may ask for.
        max_edits: Edits in one request.
        max_top: Next tokens listed and memories kept per layer (``top``).
        default_top: ``top`` when the request gives none.
    """

    max_prompt_tokens: int = 256
    max_new_tokens: int = 64
    max_edits: int = 64
    max_top: int = 20
    default_top: int = 5

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"PromptLimits.{name}={value!r}; pass a positive integer.")
        if self.default_top > self.max_top:
            raise ConfigError(f"PromptLimits.default_top={self.default_top} exceeds max_top={self.max_top}.")


def _fields(body: Any, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ConfigError(f"the request body is a JSON {type(body).__name__}; send an object with {list(allowed)}.")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown fields {unknown}; this route takes {list(allowed)}.")
    return body


def _bounded(body: Mapping[str, Any], name: str, default: int, high: int) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
        raise ConfigError(f"{name}={value!r}; pass an integer from 1 to {high} (the server's limit).")
    return value


class PromptModel:
    """A model served to the Prompt page (see the module docstring).

    Args:
        lens: The model's lens.
        name: The model's name or path, as shown on the page.
        run: The label of the run whose memories this model has (the page's memory links open it).
        limits: Request bounds.
    """

    def __init__(self, lens: MemoryLens, *, name: str, run: str | None = None, limits: PromptLimits | None = None):
        self.lens, self.name, self.run = lens, name, run
        self.limits = limits or PromptLimits()
        self.lock = threading.Lock()
        self._base: OrderedDict[tuple[tuple[int, ...], int], Trace] = OrderedDict()
        n_ctx = getattr(getattr(lens.adapter, "model", None), "cfg", None)
        self.n_ctx: int | None = getattr(n_ctx, "n_ctx", None)
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens, self.n_ctx or self.limits.max_prompt_tokens)

    @classmethod
    def load(cls, name_or_path: str, *, device: str | None = None, **options: Any) -> "PromptModel":
        """Load a model once (:func:`ffkv_lens.load_model`); ``options`` go to the constructor."""
        from ffkv_lens.adapters import load_model

        return cls(MemoryLens(load_model(name_or_path, device=device)), name=str(name_or_path), **options)

    def info(self) -> dict[str, Any]:
        """What the page shows about the model and the bounds it must keep."""
        lens = self.lens
        return {
            "model": self.name,
            "architecture": lens.architecture,
            "n_layers": lens.n_layers,
            "d_mlp": lens.d_mlp,
            "run": self.run,
            "n_ctx": self.n_ctx,
            "limits": {**asdict(self.limits), "max_prompt_tokens": self.max_prompt_tokens},
        }

    def _prompt(self, body: Mapping[str, Any], n_new: int = 0) -> Any:
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"text={text!r}; type a prompt (a non-empty string).")
        adapter = self.lens.adapter
        # Counted without truncation (to_tokens cuts at the context length); BOS included where prepended.
        n = len(adapter.tokenizer(text, add_special_tokens=False)["input_ids"]) + (adapter.bos_token_id is not None)
        if n > self.max_prompt_tokens:
            raise ConfigError(
                f"the prompt is {n} tokens long; this server takes at most {self.max_prompt_tokens} "
                "(max_prompt_tokens); shorten it."
            )
        if self.n_ctx is not None and n + n_new > self.n_ctx:
            raise ConfigError(
                f"the prompt ({n} tokens) and max_new_tokens={n_new} exceed the model's context of {self.n_ctx} "
                "tokens; ask for fewer tokens or shorten the prompt."
            )
        return adapter.to_tokens(text)

    def _edits(self, body: Mapping[str, Any]) -> tuple[Edit, ...]:
        raw = body.get("edits", [])
        if not isinstance(raw, list):
            raise ConfigError(f"edits={raw!r}; pass a list of edits like {{'layer': 3, 'keys': [7], 'op': 'zero'}}.")
        if len(raw) > self.limits.max_edits:
            raise ConfigError(f"{len(raw)} edits; this server takes at most {self.limits.max_edits} (max_edits).")
        return validate_edits(self.lens.adapter, [Edit.from_dict(one) for one in raw])

    def trace(self, body: Any) -> dict[str, Any]:
        """Answer ``/api/prompt/trace`` (see the module docstring)."""
        body = _fields(body, ("text", "edits", "top"))
        top = _bounded(body, "top", self.limits.default_top, self.limits.max_top)
        edits = self._edits(body)
        tokens = self._prompt(body)
        start = time.perf_counter()
        with self.lock:
            key = (tuple(tokens[0].tolist()), top)
            base = self._base.pop(key, None) or self.lens.trace(tokens, top=top)
            self._base[key] = base
            while len(self._base) > BASE_CACHE:
                self._base.popitem(last=False)
            edited = self.lens.trace(tokens, top=top, edits=edits) if edits else None
        return {
            "text": body["text"],
            "n_tokens": int(tokens.shape[1]),
            "base": base.to_dict(),
            "edited": None if edited is None else edited.to_dict(),
            "diff": None if edited is None else base.diff(edited).to_dict(),
            "seconds": time.perf_counter() - start,
        }

    def generate(self, body: Any) -> dict[str, Any]:
        """Answer ``/api/prompt/generate`` (see the module docstring)."""
        body = _fields(body, ("text", "edits", "max_new_tokens"))
        n_new = _bounded(body, "max_new_tokens", min(20, self.limits.max_new_tokens), self.limits.max_new_tokens)
        edits = self._edits(body)
        self._prompt(body, n_new)
        start = time.perf_counter()
        with self.lock:
            original = self.lens.generate(body["text"], max_new_tokens=n_new)
            edited = self.lens.generate(body["text"], max_new_tokens=n_new, edits=edits) if edits else None
        return {
            "text": body["text"],
            "max_new_tokens": n_new,
            "original": original,
            "edited": edited,
            "edits": [edit.to_dict() for edit in edits],
            "seconds": time.perf_counter() - start,
        }


PROMPT_ROUTES: dict[str, Callable[[PromptModel, Any], dict[str, Any]]] = {
    "/api/prompt/trace": PromptModel.trace,
    "/api/prompt/generate": PromptModel.generate,
}
