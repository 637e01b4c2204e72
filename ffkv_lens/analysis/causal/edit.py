"""Edit a located fact, and measure what the edit did and what else it changed.

``edit_fact(model, location)`` turns the top memories of a :class:`~ffkv_lens.analysis.causal.locate.FactLocation`
into :class:`~ffkv_lens.analysis.interventions.Edit` hooks acting at every position (an edit of the model,
not of one prompt): ``operation="suppress"`` scales their coefficients by ``strength`` (default 0: zeroed),
``operation="enhance"`` by ``strength`` (default 2: doubled, as in Dai et al. 2022). Then it measures:

- **efficacy**: p(target) before and after on the located prompts and on held-out ``paraphrases``;
- **specificity**: p(true target) before and after on ``unrelated`` facts, and the KL divergence
  ``KL(p_before || p_after)`` of the next-token distribution at ``kl_positions`` corpus positions drawn with
  ``seed`` from the first documents of ``corpus``;
- the **collateral audit**: the top trigger examples of each edited memory in ``atlas`` (the contexts where
  its key fires most) re-run under the edit, with the change of log p of each example's own next token,
  worst first: the behaviours the edit breaks.

Example:
    >>> corpus = fk.Corpus.default()  # doctest: +SKIP
    >>> fixed = edit_fact(lens, loc, operation="suppress", unrelated=facts[1:], corpus=corpus)  # doctest: +SKIP
    >>> fixed.summary()  # doctest: +SKIP
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from ffkv_lens.adapters import AdapterLike, MemoryAdapter, as_adapter
from ffkv_lens.analysis.atlas import TriggerAtlas
from ffkv_lens.analysis.causal.facts import Fact, next_token_logprobs, target_token_id
from ffkv_lens.analysis.causal.locate import FactLocation
from ffkv_lens.analysis.interventions import Edit, intervene
from ffkv_lens.corpus import Corpus
from ffkv_lens.errors import ConfigError

__all__ = ["OPERATIONS", "FactEdit", "edit_fact"]

log = logging.getLogger(__name__)

OPERATIONS: dict[str, float] = {"suppress": 0.0, "enhance": 2.0}


@dataclass(frozen=True)
class FactEdit:
    """The edits of a fact and their evaluation (see the module docstring).

    Attributes:
        edits: The edits (one per layer), acting at every position.
        memories: The edited memories: ``layer, key, attribution``.
        efficacy: ``kind`` (prompt / paraphrase), ``text, p_before, p_after, delta_p, predicted_before,
            predicted_after``.
        specificity: Unrelated facts: ``fact, text, target_token, p_before, p_after, delta_p``.
        kl: ``mean``, ``max``, ``positions`` of KL(p_before || p_after) on corpus positions (empty without corpus).
        audit: ``layer, key, example, prefix, next_token, logp_before, logp_after, delta_logp``, worst first.
        settings: Every setting that changes the numbers.
    """

    edits: tuple[Edit, ...]
    memories: pd.DataFrame
    efficacy: pd.DataFrame
    specificity: pd.DataFrame
    kl: dict[str, Any]
    audit: pd.DataFrame
    settings: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """The headline numbers: mean delta p on prompts and paraphrases, unrelated facts, KL, worst audit row."""
        by_kind = self.efficacy.groupby("kind")["delta_p"].mean().to_dict() if len(self.efficacy) else {}
        worst = self.audit.iloc[0].to_dict() if len(self.audit) else None
        return {
            "edits": [edit.describe() for edit in self.edits],
            "efficacy_prompts_delta_p": by_kind.get("prompt"),
            "efficacy_paraphrases_delta_p": by_kind.get("paraphrase"),
            "specificity_mean_abs_delta_p": float(self.specificity["delta_p"].abs().mean())
            if len(self.specificity)
            else None,
            "kl_mean": self.kl.get("mean"),
            "audit_examples": len(self.audit),
            "audit_worst": worst,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (tables as lists of records)."""
        return {
            "edits": [edit.to_dict() for edit in self.edits],
            "memories": self.memories.to_dict(orient="records"),
            "efficacy": self.efficacy.to_dict(orient="records"),
            "specificity": self.specificity.to_dict(orient="records"),
            "kl": self.kl,
            "audit": self.audit.to_dict(orient="records"),
            "settings": self.settings,
            "summary": self.summary(),
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=1, default=str)


def _logprobs(
    adapter: MemoryAdapter, tokens: Tensor, edits: Sequence[Edit], positions: Sequence[int] = (-1,)
) -> Tensor:
    """Next-token log-probabilities (float64) at ``positions`` (default: the last) under ``edits``."""
    with intervene(adapter, edits):
        return next_token_logprobs(adapter, tokens, positions)


def _prompt_rows(
    adapter: MemoryAdapter, texts: Sequence[str], target: str, edits: Sequence[Edit]
) -> list[dict[str, Any]]:
    rows = []
    decode = adapter.tokenizer.decode
    for text in texts:
        token = target_token_id(adapter, text, target)
        tokens = adapter.to_tokens(text)
        before, after = _logprobs(adapter, tokens, [])[0], _logprobs(adapter, tokens, edits)[0]
        rows.append(
            {
                "text": text,
                "target_token": decode([token]),
                "p_before": float(before[token].exp()),
                "p_after": float(after[token].exp()),
                "delta_p": float(after[token].exp() - before[token].exp()),
                "predicted_before": decode([int(before.argmax())]),
                "predicted_after": decode([int(after.argmax())]),
            }
        )
    return rows


def _efficacy(
    adapter: MemoryAdapter, location: FactLocation, paraphrases: Sequence[str], edits: Sequence[Edit]
) -> pd.DataFrame:
    rows = [{"kind": "prompt", **r} for r in _prompt_rows(adapter, location.prompts, location.target, edits)]
    rows += [{"kind": "paraphrase", **r} for r in _prompt_rows(adapter, paraphrases, location.target, edits)]
    return pd.DataFrame(rows, columns=["kind", "text", "target_token", "p_before", "p_after", "delta_p"] + _PRED)


_PRED = ["predicted_before", "predicted_after"]


def _specificity(adapter: MemoryAdapter, unrelated: Sequence[Fact], edits: Sequence[Edit]) -> pd.DataFrame:
    rows = [{"fact": f.id, **r} for f in unrelated for r in _prompt_rows(adapter, f.prompts, f.target, edits)]
    return pd.DataFrame(rows, columns=["fact", "text", "target_token", "p_before", "p_after", "delta_p"] + _PRED)


def _kl(
    adapter: MemoryAdapter, corpus: Corpus | None, edits: Sequence[Edit], positions: int, seed: int, max_len: int
) -> dict[str, Any]:
    """KL(p_before || p_after) at ``positions`` corpus positions drawn with ``seed`` (documents cut at ``max_len``)."""
    if corpus is None or positions == 0:
        return {}
    sequences, pool = [], 0
    for document in corpus:
        ids = adapter.tokenizer.encode(document.text, add_special_tokens=False)[:max_len]
        if ids:
            bos = [] if adapter.bos_token_id is None else [adapter.bos_token_id]
            sequences.append(torch.tensor([bos + ids], device=adapter.device))
            pool += len(ids)
        if pool >= 4 * positions:
            break
    if not sequences:
        raise ConfigError(f"corpus {corpus.name!r} has no token to measure the KL divergence on; pass another.")
    index = [(s, p) for s, seq in enumerate(sequences) for p in range(seq.shape[1])]
    generator = torch.Generator().manual_seed(seed)
    chosen = sorted(index[i] for i in torch.randperm(len(index), generator=generator)[:positions].tolist())
    values = []
    for s in sorted({s for s, _ in chosen}):
        where = [p for t, p in chosen if t == s]
        before, after = _logprobs(adapter, sequences[s], [], where), _logprobs(adapter, sequences[s], edits, where)
        values.append((before.exp() * (before - after)).sum(-1))
    kl = torch.cat(values)
    return {"mean": float(kl.mean()), "max": float(kl.max()), "positions": len(kl), "documents": len(sequences)}


def _audit(
    adapter: MemoryAdapter, atlas: TriggerAtlas | None, memories: pd.DataFrame, edits: Sequence[Edit], examples: int
) -> pd.DataFrame:
    """Each edited memory's top trigger examples under the edit: the change of log p of their next token."""
    columns = ["layer", "key", "example", "prefix", "next_token", "logp_before", "logp_after", "delta_logp"]
    if atlas is None:
        return pd.DataFrame(columns=columns)
    has_bos = atlas.manifest.get("settings", {}).get("has_bos", adapter.bos_token_id is not None)
    bos = [adapter.bos_token_id] if has_bos and adapter.bos_token_id is not None else []
    rows = []
    for layer, key in zip(memories["layer"].tolist(), memories["key"].tolist(), strict=True):
        if layer not in atlas.layers:
            log.warning("the atlas has no layer %d; memory %d:%d is not audited", layer, layer, key)
            continue
        for rank, example in enumerate(atlas.examples(layer, key)[:examples]):
            if example.next_token_id is None or example.position < 0:
                continue
            _, unit = atlas.units.get(example.unit_id)
            tokens = torch.tensor([bos + unit[: example.position + 1]], device=adapter.device)
            before = float(_logprobs(adapter, tokens, [])[0, example.next_token_id])
            after = float(_logprobs(adapter, tokens, edits)[0, example.next_token_id])
            rows.append([layer, key, rank, example.prefix, example.next_token, before, after, after - before])
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values("delta_logp", kind="stable").reset_index(drop=True)


def _edits(
    location: FactLocation, operation: str, strength: float, memories: int, shared_only: bool
) -> tuple[tuple[Edit, ...], pd.DataFrame]:
    chosen = location.memories[location.memories["attribution"] > 0]
    if shared_only and "shared" in chosen:
        chosen = chosen[chosen["shared"]]
    chosen = chosen.head(memories)
    if chosen.empty:
        raise ConfigError(
            f"the location of {location.target!r} has no memory with a positive attribution"
            f"{' that is shared' if shared_only else ''} to {operation}; locate with a larger top or shared_only=False."
        )
    by_layer: dict[int, list[int]] = {}
    for layer, key in zip(chosen["layer"].tolist(), chosen["key"].tolist(), strict=True):
        by_layer.setdefault(int(layer), []).append(int(key))
    edits = tuple(
        Edit.zero(layer, keys) if strength == 0 else Edit.scale(layer, keys, strength)
        for layer, keys in sorted(by_layer.items())
    )
    return edits, chosen


def _check(operation: str, strength: float | None, memories: int) -> float:
    if operation not in OPERATIONS:
        raise ConfigError(f"operation={operation!r} is not an operation; pass one of {list(OPERATIONS)}.")
    value = OPERATIONS[operation] if strength is None else strength
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(f"strength={strength!r}; pass a number.")
    if operation == "suppress" and not 0 <= value < 1:
        raise ConfigError(f"strength={value!r} does not suppress; pass a factor in [0, 1) (0 zeroes the memories).")
    if operation == "enhance" and not value > 1:
        raise ConfigError(f"strength={value!r} does not enhance; pass a factor above 1 (2 doubles the memories).")
    if not isinstance(memories, int) or memories < 1:
        raise ConfigError(f"memories={memories!r}; pass a positive number of memories to edit.")
    return float(value)


def edit_fact(
    model: AdapterLike,
    location: FactLocation,
    *,
    operation: str = "suppress",
    strength: float | None = None,
    memories: int = 5,
    shared_only: bool = False,
    paraphrases: Sequence[str] = (),
    unrelated: Sequence[Fact] | None = None,
    corpus: Corpus | None = None,
    atlas: TriggerAtlas | None = None,
    kl_positions: int = 256,
    kl_max_len: int = 64,
    audit_examples: int = 10,
    seed: int = 0,
) -> FactEdit:
    """Suppress or enhance the memories that carry a located fact, and evaluate the edit.

    Args:
        model: The model the location was computed on.
        location: A :func:`~ffkv_lens.analysis.causal.locate.locate_fact` result.
        operation: ``"suppress"`` or ``"enhance"``.
        strength: Factor on the coefficients (default 0 for suppress, 2 for enhance).
        memories: Edit the top ``memories`` memories with a positive attribution.
        shared_only: Edit only memories marked shared across the prompts.
        paraphrases: Held-out prompts of the same fact (efficacy).
        unrelated: Other facts whose true target should not move (specificity).
        corpus: Corpus for the KL divergence (default: none, no KL).
        atlas: Trigger atlas of the model for the collateral audit (default: none, no audit).
        kl_positions: Corpus positions sampled for the KL divergence.
        kl_max_len: Tokens read from each corpus document.
        audit_examples: Top trigger examples audited per edited memory.
        seed: Seed of the KL position sample.

    Returns:
        A :class:`FactEdit`.

    Raises:
        ConfigError: A bad operation or strength, or no memory to edit.
        AtlasMismatchError: ``atlas`` was searched on another model.
    """
    adapter = as_adapter(model)
    factor = _check(operation, strength, memories)
    if atlas is not None:
        atlas.check_matches(adapter)
    edits, chosen = _edits(location, operation, factor, memories, shared_only)
    efficacy = _efficacy(adapter, location, paraphrases, edits)
    specificity = _specificity(adapter, unrelated or (), edits)
    kl = _kl(adapter, corpus, edits, kl_positions, seed, kl_max_len)
    audit = _audit(adapter, atlas, chosen, edits, audit_examples)
    settings = {
        "operation": operation,
        "strength": factor,
        "memories": memories,
        "shared_only": shared_only,
        "positions": "all",
        "kl": "KL(p_before || p_after) of the next-token distribution",
        "kl_positions": kl_positions,
        "kl_max_len": kl_max_len,
        "seed": seed,
        "corpus": None if corpus is None else corpus.name,
        "audit_examples": audit_examples,
        "location": location.settings,
    }
    return FactEdit(
        edits=edits,
        memories=chosen[["layer", "key", "attribution"]].reset_index(drop=True),
        efficacy=efficacy,
        specificity=specificity,
        kl=kl,
        audit=audit,
        settings=settings,
    )
