"""Facts to locate and edit: the fact file format (JSONL), its reader and a check that the model knows a fact.

One fact per line, a JSON object:

- ``prompts`` (list of str, required): texts the model completes with the answer;
- ``target`` (str, required): the answer. Only its **first token** is measured (p(target) is the probability
  of that token as the next token). A target without leading whitespace gets one space prepended when the
  prompt does not end in whitespace, as byte-level and SentencePiece tokenizers spell a word after a word
  (``"Paris"`` after ``"... is"`` is measured as the token of ``" Paris"``);
- ``paraphrases`` (list of str, optional): held-out prompts of the same fact, used only to measure efficacy;
- ``relation``, ``subject``, ``id`` (str, optional): labels (``id`` defaults to ``line<N>``).

Blank lines and lines starting with ``#`` are skipped. Every bad line raises one
:class:`~ffkv_lens.errors.FactFileError` naming ``file:line`` and the fix. The reader parses JSON only.

Example:
    >>> import json
    >>> fact = parse_fact(json.loads('{"prompts": ["The capital of France is"], "target": " Paris"}'), where="x:1")
    >>> fact.prompts, fact.target, fact.id
    (('The capital of France is',), ' Paris', 'x:1')
"""

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ffkv_lens.adapters import AdapterLike, MemoryAdapter, as_adapter
from ffkv_lens.errors import ConfigError, FactFileError

__all__ = [
    "FACT_FIELDS",
    "Fact",
    "answer_text",
    "check_fact",
    "check_facts",
    "next_token_logprobs",
    "next_token_probs",
    "parse_fact",
    "read_facts",
    "target_token_id",
]

log = logging.getLogger(__name__)

FACT_FIELDS: tuple[str, ...] = ("prompts", "target", "paraphrases", "relation", "subject", "id")
_FIX = (
    'write one JSON object per line, e.g. {"prompts": ["The capital of France is"], "target": " Paris", '
    '"paraphrases": ["France has its capital in"], "relation": "capital"}'
)


@dataclass(frozen=True)
class Fact:
    """One fact: prompts the model completes with ``target`` (only its first token is measured).

    Attributes:
        prompts: Prompts used to locate the fact.
        target: The answer text.
        paraphrases: Held-out prompts (efficacy only).
        relation: Optional label, e.g. ``"capital"``.
        subject: Optional label, e.g. ``"France"``.
        id: Name of the fact in tables and folders.
    """

    prompts: tuple[str, ...]
    target: str
    paraphrases: tuple[str, ...] = ()
    relation: str | None = None
    subject: str | None = None
    id: str = field(default="fact")

    def to_dict(self) -> dict[str, Any]:
        """The fact as a JSON object of the file format."""
        out: dict[str, Any] = {"id": self.id, "prompts": list(self.prompts), "target": self.target}
        if self.paraphrases:
            out["paraphrases"] = list(self.paraphrases)
        out.update({k: v for k, v in (("relation", self.relation), ("subject", self.subject)) if v is not None})
        return out


def _texts(data: Mapping[str, Any], name: str, where: str, *, required: bool) -> tuple[str, ...]:
    value = data.get(name)
    if value is None and not required:
        return ()
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t.strip() for t in value):
        raise FactFileError(
            f'{where}: "{name}" is {value!r}; it must be a non-empty list of non-empty strings; {_FIX}.'
        )
    return tuple(value)


def _label(data: Mapping[str, Any], name: str, where: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise FactFileError(f'{where}: "{name}" is {value!r}; it must be a string; {_FIX}.')
    return value


def parse_fact(data: Any, *, where: str, default_id: str | None = None) -> Fact:
    """A :class:`Fact` from one parsed JSON object; ``where`` (e.g. ``"facts.jsonl:3"``) names it in errors.

    The fact's ``id`` is its ``"id"`` field, else ``default_id``, else ``where``.

    Raises:
        FactFileError: Not an object, an unknown field, a missing or mistyped field.
    """
    if not isinstance(data, dict):
        raise FactFileError(f"{where}: a fact must be a JSON object, got {type(data).__name__}; {_FIX}.")
    unknown = sorted(set(data) - set(FACT_FIELDS))
    if unknown:
        raise FactFileError(f"{where}: unknown field {unknown[0]!r}; the fields are {list(FACT_FIELDS)}.")
    prompts = _texts(data, "prompts", where, required=True)
    target = data.get("target")
    if not isinstance(target, str) or not target.strip():
        raise FactFileError(f'{where}: "target" is {target!r}; it must be a non-empty string; {_FIX}.')
    return Fact(
        prompts=prompts,
        target=target,
        paraphrases=_texts(data, "paraphrases", where, required=False),
        relation=_label(data, "relation", where),
        subject=_label(data, "subject", where),
        id=_label(data, "id", where) or default_id or where,
    )


def _json_line(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise FactFileError(f"{where}: not JSON ({exc.msg} at column {exc.colno}); {_FIX}.") from None


def read_facts(path: str | Path) -> list[Fact]:
    """Every fact of a JSONL fact file (see the module docstring).

    Raises:
        FactFileError: The file is missing, not UTF-8, empty of facts, a line is bad, or two facts share an id.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FactFileError(f"fact file {str(path)!r} does not exist; pass the path of a JSONL fact file.") from None
    except IsADirectoryError:
        raise FactFileError(f"fact file {str(path)!r} is a folder; pass the path of a JSONL fact file.") from None
    except UnicodeDecodeError as exc:
        raise FactFileError(f"fact file {str(path)!r} is not UTF-8 (byte {exc.start}); save it as UTF-8.") from None
    facts: list[Fact] = []
    seen: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path.name}:{number}"
        fact = parse_fact(_json_line(line, where), where=where, default_id=f"line{number}")
        if fact.id in seen:
            raise FactFileError(f"{where}: id {fact.id!r} is used by {seen[fact.id]} too; give each fact its own id.")
        seen[fact.id] = where
        facts.append(fact)
    if not facts:
        raise FactFileError(f"fact file {str(path)!r} holds no fact; {_FIX}.")
    return facts


def answer_text(prompt: str, target: str) -> str:
    """The text whose first token is measured: ``target``, with a leading space after a word."""
    if target[:1].isspace() or not prompt or prompt[-1:].isspace():
        return target
    return " " + target


def target_token_id(model: AdapterLike, prompt: str, target: str) -> int:
    """Id of the first token of the answer after ``prompt`` (see :func:`answer_text`)."""
    adapter = as_adapter(model)
    ids = adapter.tokenizer.encode(answer_text(prompt, target), add_special_tokens=False)
    if not ids:
        raise ConfigError(f"target {target!r} has no token; pass a non-empty answer.")
    return int(ids[0])


def next_token_logprobs(adapter: MemoryAdapter, tokens: torch.Tensor, positions: Sequence[int] = (-1,)) -> torch.Tensor:
    """Next-token log-probabilities (float64) of row 0 at ``positions``, ``[len(positions), d_vocab]``.

    The forward pass stops at the final residual stream and only ``positions`` are read out
    (:meth:`~ffkv_lens.adapters.MemoryAdapter.readout`: final norm, unembedding, soft-cap), which spares the
    unembedding of every other position on large vocabularies. Hooks active on the model (edits) apply.
    """
    name = adapter.readout_hooks().resid
    with adapter.inference():
        resid = adapter.record(tokens, [name], stop_after=name)[name]
        logits = adapter.readout(resid[0, list(positions)])
    return torch.log_softmax(logits.double(), dim=-1)


def next_token_probs(adapter: MemoryAdapter, prompt: str) -> torch.Tensor:
    """The next-token distribution after ``prompt`` (float64), ``[d_vocab]``."""
    return next_token_logprobs(adapter, adapter.to_tokens(prompt))[0].exp()


def check_fact(model: AdapterLike, fact: Fact) -> pd.DataFrame:
    """Whether the model gets ``fact`` right: its greedy next token is the target's first token, per prompt.

    Returns:
        One row per prompt: ``prompt, target_token, predicted_token, p_target, correct``.
    """
    adapter = as_adapter(model)
    if not adapter.causal:
        raise ConfigError(f"{adapter.architecture} is not a causal LM; facts are next-token predictions.")
    rows = []
    for prompt in fact.prompts:
        target = target_token_id(adapter, prompt, fact.target)
        probs = next_token_probs(adapter, prompt)
        predicted = int(probs.argmax())
        rows.append(
            {
                "prompt": prompt,
                "target_token": adapter.tokenizer.decode([target]),
                "predicted_token": adapter.tokenizer.decode([predicted]),
                "p_target": float(probs[target]),
                "correct": predicted == target,
            }
        )
    return pd.DataFrame(rows)


def check_facts(model: AdapterLike, facts: Sequence[Fact]) -> pd.DataFrame:
    """:func:`check_fact` of each fact, one row per fact: ``id, target, prompts, correct_prompts, correct, p_target``.

    ``correct`` is True when every prompt is predicted; ``p_target`` is the smallest over the prompts.
    """
    rows = []
    for fact in facts:
        table = check_fact(model, fact)
        rows.append(
            {
                "id": fact.id,
                "target": fact.target,
                "prompts": len(table),
                "correct_prompts": int(table["correct"].sum()),
                "correct": bool(table["correct"].all()),
                "p_target": float(table["p_target"].min()),
                "predicted": "|".join(table["predicted_token"]),
            }
        )
    return pd.DataFrame(rows)
