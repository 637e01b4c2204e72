"""Trace one prompt through the memories, with or without edits: one forward pass.

For the position traced, :func:`trace` records the model's next-token distribution, the readout
(final norm + unembedding) of the residual stream before and after every FFN, and every layer's
top memories by contribution to the predicted token, with the definition of
:mod:`ffkv_lens.analysis.contributions` (each layer's contributions sum to its FFN's direct logit
attribution without bias); factors that depend on the weights only are cached per adapter, so an
"edit + re-run" of one prompt costs about one forward pass and the readouts. Under ``edits``
the same pass runs with the edit hooks in front of the recording hooks, so everything recorded
is the edited model's. :meth:`Trace.diff` compares two
traces of the same prompt; :meth:`Trace.to_dict` is JSON (for a web page).

Example:
    >>> base = lens.trace("The capital of France is")  # doctest: +SKIP
    >>> edited = lens.trace("The capital of France is", edits=[Edit.zero(20, [7])])  # doctest: +SKIP
    >>> base.diff(edited).next_tokens.head()  # doctest: +SKIP
"""

import json
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from ffkv_lens.adapters.base import MemoryAdapter
from ffkv_lens.analysis.contributions import DEFINITION
from ffkv_lens.analysis.interventions.edits import Edit, edit_hooks, validate_edits
from ffkv_lens.errors import ConfigError

__all__ = ["Trace", "TraceDiff", "prompt_tokens", "trace"]


def records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """A DataFrame as JSON-safe records (numpy scalars as Python numbers, NaN as None)."""
    return json.loads(table.to_json(orient="records"))


@dataclass(frozen=True, eq=False)
class Trace:
    """One prompt traced at one position (see the module docstring).

    Attributes:
        tokens: The prompt's tokens as text (BOS included when the model prepends it).
        position: The position traced (non-negative).
        prediction_id: The model's top next token at ``position``.
        prediction: Its text.
        next_tokens: ``rank, token_id, token, prob, logit``: the top next tokens.
        layers: ``layer, top_before_ffn, p_top_before_ffn, p_pred_before_ffn, top_after_ffn,
            p_top_after_ffn, p_pred_after_ffn, ffn_contribution``: the readout of the residual
            before and after each FFN (its top token and probabilities, ``pred`` = the final
            prediction), and the sum of the layer's contributions to the prediction.
        memories: ``layer, rank, key, coefficient, contribution, value_top_tokens``: each layer's
            top memories by contribution to the prediction.
        edits: The edits the trace ran under.
        settings: Every setting that changes the numbers (position, top, definition, model).
        probs: The next-token distribution ``[d_vocab]``.
        layer_probs: Readout distributions ``[n_layers, 2, d_vocab]`` (before, after each FFN).
    """

    tokens: list[str]
    position: int
    prediction_id: int
    prediction: str
    next_tokens: pd.DataFrame
    layers: pd.DataFrame
    memories: pd.DataFrame
    edits: tuple[Edit, ...]
    settings: dict[str, Any]
    probs: Tensor = field(repr=False)
    layer_probs: Tensor = field(repr=False)

    def prob(self, token_id: int) -> float:
        """Next-token probability of ``token_id``."""
        return float(self.probs[token_id])

    def diff(self, other: "Trace") -> "TraceDiff":
        """The change from this trace to ``other`` (same prompt and position), e.g. ``base.diff(edited)``."""
        if other.tokens != self.tokens or other.position != self.position:
            raise ConfigError("diff() compares traces of the same prompt and position; these differ.")
        return _diff(self, other)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (without the full distributions)."""
        return {
            "tokens": self.tokens,
            "position": self.position,
            "prediction": {
                "token_id": self.prediction_id,
                "token": self.prediction,
                "prob": self.prob(self.prediction_id),
            },
            "next_tokens": records(self.next_tokens),
            "layers": records(self.layers),
            "memories": records(self.memories),
            "edits": [edit.to_dict() for edit in self.edits],
            "settings": self.settings,
        }


@dataclass(frozen=True, eq=False)
class TraceDiff:
    """How next-token probabilities and per-layer readouts change from trace ``a`` to trace ``b``.

    Attributes:
        prediction: ``(a's prediction, b's prediction)`` as text.
        next_tokens: ``token_id, token, prob, prob_other, change`` for the union of both top
            lists, largest ``|change|`` first.
        layers: ``layer, p_pred_before_ffn, p_pred_before_ffn_other, p_pred_after_ffn,
            p_pred_after_ffn_other, change_after_ffn, top_after_ffn, top_after_ffn_other``: the
            probability of a's prediction in each layer's readout, in both traces.
    """

    prediction: tuple[str, str]
    next_tokens: pd.DataFrame
    layers: pd.DataFrame

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "prediction": list(self.prediction),
            "prediction_changed": self.prediction[0] != self.prediction[1],
            "next_tokens": records(self.next_tokens),
            "layers": records(self.layers),
        }


def _diff(a: Trace, b: Trace) -> TraceDiff:
    ids = list(dict.fromkeys(a.next_tokens.token_id.tolist() + b.next_tokens.token_id.tolist()))
    tokens = dict(zip(a.next_tokens.token_id, a.next_tokens.token, strict=True))
    tokens.update(zip(b.next_tokens.token_id, b.next_tokens.token, strict=True))
    nxt = pd.DataFrame(
        {
            "token_id": ids,
            "token": [tokens[i] for i in ids],
            "prob": [a.prob(i) for i in ids],
            "prob_other": [b.prob(i) for i in ids],
        }
    )
    nxt["change"] = nxt.prob_other - nxt.prob
    nxt = nxt.reindex(nxt.change.abs().sort_values(ascending=False, kind="stable").index).reset_index(drop=True)
    pred = a.prediction_id
    layers = pd.DataFrame(
        {
            "layer": a.layers.layer,
            "p_pred_before_ffn": a.layer_probs[:, 0, pred].double().cpu().numpy(),
            "p_pred_before_ffn_other": b.layer_probs[:, 0, pred].double().cpu().numpy(),
            "p_pred_after_ffn": a.layer_probs[:, 1, pred].double().cpu().numpy(),
            "p_pred_after_ffn_other": b.layer_probs[:, 1, pred].double().cpu().numpy(),
        }
    )
    layers["change_after_ffn"] = layers.p_pred_after_ffn_other - layers.p_pred_after_ffn
    layers["top_after_ffn"] = a.layers.top_after_ffn
    layers["top_after_ffn_other"] = b.layers.top_after_ffn.to_numpy()
    return TraceDiff((a.prediction, b.prediction), nxt, layers)


def prompt_tokens(adapter: MemoryAdapter, source: Any) -> Tensor:
    """Token ids ``[1, pos]`` of text or of token ids ``[pos]`` / ``[1, pos]``, on the model's device."""
    if isinstance(source, str):
        tokens = adapter.to_tokens(source)
    elif isinstance(source, Tensor) and source.dtype in (torch.int32, torch.int64) and source.ndim in (1, 2):
        tokens = source if source.ndim == 2 else source.unsqueeze(0)
    else:
        raise ConfigError(f"source is a {type(source).__name__}; pass text or token ids [pos] or [1, pos].")
    if tokens.shape[0] != 1 or tokens.shape[1] == 0:
        raise ConfigError(f"trace() reads one non-empty prompt; got tokens of shape {tuple(tokens.shape)}.")
    return tokens.to(adapter.device)


def _record(adapter: MemoryAdapter, tokens: Tensor, edits: tuple[Edit, ...]) -> tuple[Tensor, dict[str, Tensor]]:
    names: list[str] = list(adapter.readout_hooks().required())
    for layer in range(adapter.n_layers):
        hooks = adapter.hook_names(layer)
        names += [hooks.coefficients, hooks.ffn_output, hooks.resid_after_ffn]
        names += [n for n in (hooks.resid_before_ffn, hooks.post_ffn_scale) if n is not None]
    acts: dict[str, Tensor] = {}

    def keep(tensor: Tensor, hook: Any) -> None:
        acts[hook.name] = tensor.detach()

    hooks = edit_hooks(adapter, edits) + [(name, keep) for name in dict.fromkeys(names)]
    logits = adapter.run_with_hooks(tokens, hooks)
    missing = [n for n in names if n not in acts]
    if logits is None or missing:
        raise ConfigError(f"trace(): these hooks did not fire: {missing}.")
    return logits, acts


def _readouts(adapter: MemoryAdapter, acts: dict[str, Tensor], position: int) -> Tensor:
    """Readout distributions ``[n_layers, 2, d_vocab]`` of the residual before and after each FFN."""
    rows = []
    for layer in range(adapter.n_layers):
        rows.append(adapter.residual_before_ffn(acts, layer)[0, position])
        rows.append(acts[adapter.hook_names(layer).resid_after_ffn][0, position])
    probs = adapter.readout(torch.stack(rows).to(adapter.device)).float().softmax(-1)
    return probs.reshape(adapter.n_layers, 2, -1)


class _WeightCache:
    """Per-memory quantities that depend on the weights only, reused across traces of one adapter.

    Entries are keyed by the version counters of ``W_out`` and ``W_U``, so an in-place weight edit
    (e.g. :func:`edited_values`) makes them stale and they are recomputed.
    """

    def __init__(self) -> None:
        self.token_logits: dict[tuple[int, int, int, int], Tensor] = {}
        self.value_tokens: dict[tuple[int, int, int, int, int], list[str]] = {}

    @staticmethod
    def _versions(adapter: MemoryAdapter, layer: int) -> tuple[int, int]:
        return adapter.value_weight(layer)._version, adapter.unembedding()._version

    def token_column(self, adapter: MemoryAdapter, layer: int, token: int) -> Tensor:
        """``value_token_logits(layer, [token])[:, 0]``: every memory's direction-only logit of ``token``."""
        key = (layer, token, *self._versions(adapter, layer))
        if key not in self.token_logits:
            self.token_logits[key] = adapter.value_token_logits(layer, [token])[:, 0].float()
        return self.token_logits[key]

    def top_tokens(self, adapter: MemoryAdapter, layer: int, keys: list[int], k: int) -> list[list[str]]:
        """The top ``k`` value tokens of each memory in ``keys`` (``value_logits``)."""
        versions = self._versions(adapter, layer)
        todo = [key for key in keys if (layer, key, k, *versions) not in self.value_tokens]
        if todo and k > 0:
            ids = adapter.value_logits(layer, todo).topk(k, dim=-1).indices.tolist()
            for key, row in zip(todo, ids, strict=True):
                self.value_tokens[(layer, key, k, *versions)] = adapter.tokenizer.batch_decode([[t] for t in row])
        return [self.value_tokens[(layer, key, k, *versions)] if k > 0 else [] for key in keys]


_CACHES: "weakref.WeakKeyDictionary[MemoryAdapter, _WeightCache]" = weakref.WeakKeyDictionary()


def _memories(
    adapter: MemoryAdapter, acts: dict[str, Tensor], position: int, token: int, top: int, top_tokens: int
) -> tuple[pd.DataFrame, dict[int, float]]:
    """Each layer's top memories by contribution to ``token`` and each layer's total.

    The arithmetic is :func:`ffkv_lens.analysis.contributions.contributions`'s, step for step
    (:data:`DEFINITION`), with the weight-only factor cached; tests check both agree.
    """
    cache = _CACHES.setdefault(adapter, _WeightCache())
    s_final = acts[adapter.readout_hooks().norm_scale][0, position].reshape(())
    frames, totals = [], {}
    for layer in range(adapter.n_layers):
        hooks = adapter.hook_names(layer)
        m = acts[hooks.coefficients][0, position].float()
        scale = acts[hooks.post_ffn_scale][0, position].reshape(()) if hooks.post_ffn_scale is not None else 1.0
        contrib = ((m / scale) * cache.token_column(adapter, layer, token) / s_final).double()
        totals[layer] = float(contrib.sum())
        order = torch.sort(contrib, descending=True, stable=True).indices[:top].tolist()
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "rank": range(len(order)),
                    "key": order,
                    "coefficient": m[order].double().cpu().numpy(),
                    "contribution": contrib[order].cpu().numpy(),
                    "value_top_tokens": cache.top_tokens(adapter, layer, order, top_tokens),
                }
            )
        )
    return pd.concat(frames, ignore_index=True), totals


def _layer_table(
    adapter: MemoryAdapter, layer_probs: Tensor, prediction: int, totals: dict[int, float]
) -> pd.DataFrame:
    top_p, top_id = layer_probs.max(dim=-1)
    decode = lambda ids: adapter.tokenizer.batch_decode([[int(i)] for i in ids])  # noqa: E731
    return pd.DataFrame(
        {
            "layer": range(adapter.n_layers),
            "top_before_ffn": decode(top_id[:, 0]),
            "p_top_before_ffn": top_p[:, 0].double().cpu().numpy(),
            "p_pred_before_ffn": layer_probs[:, 0, prediction].double().cpu().numpy(),
            "top_after_ffn": decode(top_id[:, 1]),
            "p_top_after_ffn": top_p[:, 1].double().cpu().numpy(),
            "p_pred_after_ffn": layer_probs[:, 1, prediction].double().cpu().numpy(),
            "ffn_contribution": [totals[layer] for layer in range(adapter.n_layers)],
        }
    )


def trace(
    adapter: MemoryAdapter,
    source: Any,
    *,
    position: int = -1,
    top: int = 10,
    edits: Edit | Iterable[Edit] | None = None,
    top_tokens: int = 5,
) -> Trace:
    """Trace a prompt at ``position`` (see the module docstring); one forward pass.

    Args:
        adapter: The model's adapter.
        source: Text, or token ids ``[pos]`` / ``[1, pos]``.
        position: Position to trace (negative from the end).
        top: Next tokens listed, and memories kept per layer.
        edits: Edits to run under (:class:`Edit`); ``None`` for the model as it is.
        top_tokens: Top value tokens listed per memory.

    Returns:
        A :class:`Trace`.

    Raises:
        ConfigError: For a bad source, position, ``top`` or edit, or a model without an unembedding (BERT).
    """
    if adapter.spec.readout != "unembed":
        raise ConfigError(f"trace() needs a decoder with an unembedding; {adapter.architecture} has not.")
    for name, value, low in (("top", top, 1), ("top_tokens", top_tokens, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name}={value!r}; pass an integer >= {low}.")
    chosen = validate_edits(adapter, () if edits is None else edits)
    tokens = prompt_tokens(adapter, source)
    n_pos = tokens.shape[1]
    if not isinstance(position, int) or not -n_pos <= position < n_pos:
        raise ConfigError(f"position={position!r} is outside the prompt's {n_pos} tokens.")
    position %= n_pos
    with torch.no_grad():
        logits, acts = _record(adapter, tokens, chosen)
        final = logits[0, position].float()
        probs = final.softmax(-1)
        top_p, top_id = probs.topk(min(top, adapter.d_vocab))
        prediction = int(top_id[0])
        memories, totals = _memories(adapter, acts, position, prediction, top, min(top_tokens, adapter.d_vocab))
        layer_probs = _readouts(adapter, acts, position)
    decode = adapter.tokenizer.batch_decode
    next_tokens = pd.DataFrame(
        {
            "rank": range(len(top_id)),
            "token_id": top_id.tolist(),
            "token": decode([[int(i)] for i in top_id]),
            "prob": top_p.double().cpu().numpy(),
            "logit": final[top_id].double().cpu().numpy(),
        }
    )
    settings = {
        "position": position,
        "top": top,
        "top_tokens": top_tokens,
        "definition": DEFINITION,
        "readout": "each residual through the model's final norm (its own statistics) and unembedding, softmax",
        "value_readout_mode": adapter.value_readout_mode,
        "model": adapter.describe(),
    }
    return Trace(
        tokens=decode([[int(t)] for t in tokens[0]]),
        position=position,
        prediction_id=prediction,
        prediction=str(next_tokens.token[0]),
        next_tokens=next_tokens,
        layers=_layer_table(adapter, layer_probs, prediction, totals),
        memories=memories,
        edits=chosen,
        settings=settings,
        probs=probs.cpu(),
        layer_probs=layer_probs.cpu(),
    )
