"""Per-token coefficients of a memory's quantile samples, recomputed with the browser's model (``browse --model``).

The index keeps each sample's text and the sampled token's coefficient (what the search recorded),
plus the token ids of the units the samples lie in. With a model, ``/api/memory/tokens`` runs those
units once more, batched as the search ran them (BOS first where the model prepends one, right
padding with an attention mask), and returns the memory's coefficient at every token of each
sample's prefix, so the page can shade the text token by token. The last token's recomputed
coefficient is the sampled one (equal to the recorded coefficient up to float noise; the answer
reports the largest difference as ``max_abs_difference``).
"""

import json
from typing import Any

import numpy as np

from ffkv_lens.browser.prompt import PromptModel
from ffkv_lens.browser.queries import BrowserIndex
from ffkv_lens.errors import ConfigError

__all__ = ["BATCH_TOKENS", "sample_token_coefficients"]

BATCH_TOKENS = 4096  # tokens per forward pass


def sample_token_coefficients(prompt: PromptModel | None, run: str, index: BrowserIndex, layer: int, key: int) -> dict:
    """Answer ``/api/memory/tokens``: per quantile group, per sample, ``[{"token", "coefficient"}, ...]``.

    Raises:
        ConfigError: The server has no model, or its model belongs to another run than ``run``.
    """
    if prompt is None:
        raise ConfigError(
            "per-token coefficients need the model; restart the browser with `ffkv-lens browse RUN_DIR --model`."
        )
    if prompt.run is not None and run != prompt.run:
        raise ConfigError(f"the model of this browser is run {prompt.run!r}'s, not {run!r}'s; pass run={prompt.run}.")
    memory = index.memory_id(layer, key)
    samples = index.conn.execute(
        """SELECT s.grp, c.unit_id, c.position, s.coefficient FROM quantile_samples s
        JOIN sample_contexts c ON c.id = s.context WHERE s.memory = ? ORDER BY s.grp, s.ord""",
        (memory,),
    ).fetchall()
    units = sorted({s["unit_id"] for s in samples})
    rows = index.conn.execute(
        "SELECT unit_id, doc_id, tokens FROM sample_units WHERE unit_id IN (SELECT value FROM json_each(?))",
        (json.dumps(units),),
    ).fetchall()
    tokens = {r["unit_id"]: (r["doc_id"], np.frombuffer(r["tokens"], dtype="<i4").tolist()) for r in rows}
    with prompt.lock:
        per_unit = _unit_coefficients(prompt, tokens, layer, key)
    decode = _decoder(prompt, tokens)
    groups: dict[str, list[list[dict[str, Any]]]] = {}
    worst = 0.0
    for s in samples:
        ids, m = tokens[s["unit_id"]][1][: s["position"] + 1], per_unit[s["unit_id"]][: s["position"] + 1]
        if m:  # a sample on the BOS (position -1) has no token of its own
            worst = max(worst, abs(m[-1] - s["coefficient"]))
        groups.setdefault(str(s["grp"]), []).append(
            [{"token": decode[t], "coefficient": v} for t, v in zip(ids, m, strict=True)]
        )
    return {"layer": layer, "key": key, "groups": groups, "max_abs_difference": worst, "model": prompt.name}


def _unit_coefficients(prompt: PromptModel, units: dict[int, tuple[int, list[int]]], layer: int, key: int) -> dict:
    """``{unit_id: [m at each of its tokens]}`` for one memory, the units batched as the search batches them."""
    import torch

    from ffkv_lens.corpus import iter_batches
    from ffkv_lens.corpus.units import Unit

    adapter = prompt.lens.adapter
    tok = adapter.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    items = (Unit(u, d, tuple(t), "", None, None) for u, (d, t) in sorted(units.items()))
    out, bos = {}, adapter.bos_token_id
    with torch.no_grad():
        for batch in iter_batches(items, batch_tokens=BATCH_TOKENS, bos_token_id=bos, pad_token_id=pad):
            tokens, mask = batch.tokens.to(adapter.device), batch.attention_mask.to(adapter.device)
            m = prompt.lens.coefficients(tokens, layers=[layer], attention_mask=mask)[layer]
            m = m[..., key].double().cpu()
            shift = int(batch.has_bos)
            for row, (unit, n) in enumerate(zip(batch.unit_ids.tolist(), batch.lengths.tolist(), strict=True)):
                out[unit] = m[row, shift : shift + n].tolist()
    return out


def _decoder(prompt: PromptModel, units: dict[int, tuple[int, list[int]]]) -> dict[int, str]:
    ids = sorted({t for _, tokens in units.values() for t in tokens})
    return dict(zip(ids, prompt.lens.adapter.tokenizer.batch_decode([[t] for t in ids]), strict=True))
