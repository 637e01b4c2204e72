"""How the mutation test gets its coefficients: two strategies over the same examples.

- :func:`run_prefix` (the reference, any model): every distinct original or mutated prefix is run
  alone (right-padded, masked) once per layer, up to that layer, and its last position is read.
- :func:`run_shared` (causal models only): on a causal model the coefficient at the last position
  of a prefix equals the coefficient at that position of any longer sequence that starts with the
  prefix. Every prefix the test needs is therefore a prefix of one of a few *variant sequences*
  per unit (the unit itself, without its first token, without the random token), each run once up
  to the deepest layer any of its requests needs; hooks on ``mlp.hook_post`` gather the requested
  ``(layer, position, key)`` entries during that forward pass.

Both strategies use the same examples and the same random tokens, so they give the same numbers
(tested within 1e-5 relative; they differ by floating-point summation order only).
"""

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from ffkv_lens.adapters import MemoryAdapter
from ffkv_lens.analysis.mutation.batching import batch_bounds, cheapest_bounds, pad_token, padded
from ffkv_lens.analysis.mutation.examples import Examples
from ffkv_lens.errors import HookNotFiredError

__all__ = ["run_prefix", "run_shared"]

log = logging.getLogger(__name__)


# -- the reference: each prefix alone, once per layer --------------------------------------------
def _prefixes(ex: Examples, rows: np.ndarray, dedupe: bool) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """Distinct prefix sequences of some examples and, per example, the index of each of its four."""
    index: dict[tuple[int, ...], int] = {}
    prefixes: list[tuple[int, ...]] = []
    seq = np.zeros((len(rows), 4), dtype=np.int64)
    for i, row in enumerate(rows.tolist()):
        unit, position, j = (ex.rows[name][row] for name in ("unit_id", "position", "random_index"))
        own = ex.units[unit][: position + 1]
        for m, tokens in enumerate((own, own[1:], own[:-1], own[:j] + own[j + 1 :])):
            full = ex.head + tokens
            if not dedupe or full not in index:
                index[full] = len(prefixes)
                prefixes.append(full)
            seq[i, m] = index[full] if dedupe else len(prefixes) - 1
    return prefixes, seq


def run_prefix(
    adapter: MemoryAdapter, ex: Examples, batch_tokens: int, dedupe: bool, progress: bool
) -> tuple[np.ndarray, dict]:
    """``[examples, 4]`` coefficients (orig, first, last, random), each prefix run alone per layer."""
    from tqdm.auto import tqdm

    layer_of = np.asarray(ex.rows["layer"], dtype=np.int64)
    keys = np.asarray(ex.rows["key"], dtype=np.int64)
    plans = {layer: np.nonzero(layer_of == layer)[0] for layer in ex.skipped_short}
    plans = {layer: (rows, *_prefixes(ex, rows, dedupe)) for layer, rows in plans.items()}
    tokens = {layer: sum(len(p) for p in prefixes) for layer, (_, prefixes, _) in plans.items()}
    work = {layer: (layer + 1) * n for layer, n in tokens.items()}
    stats: dict[str, Any] = {
        "strategy": "prefix",
        "unique_sequences": {layer: len(plan[1]) for layer, plan in plans.items()},
        "requested_sequences": {layer: 4 * len(plan[0]) for layer, plan in plans.items()},
        "tokens": sum(tokens.values()),
        "token_layers": sum(work.values()),
        "seconds": {},
    }
    log.info(
        "mutation test (prefix): %d sequences, %d tokens x layers",
        sum(stats["unique_sequences"].values()),
        stats["token_layers"],
    )
    out = np.zeros((len(ex), 4))
    with tqdm(
        total=stats["token_layers"], desc="mutation test", unit="tok*layer", unit_scale=True, disable=not progress
    ) as bar:
        for layer, (rows, prefixes, seq) in plans.items():
            start = time.perf_counter()
            pair_key = torch.as_tensor(np.repeat(keys[rows], 4))
            values = _last_coefficients(
                adapter, layer, prefixes, torch.as_tensor(seq.reshape(-1)), pair_key, batch_tokens
            )
            out[rows] = values.reshape(-1, 4).numpy()
            stats["seconds"][layer] = round(time.perf_counter() - start, 3)
            log.info("layer %d: %d sequences in %.1f s", layer, len(prefixes), stats["seconds"][layer])
            bar.update(work[layer])
    return out, stats


def _last_coefficients(
    adapter: MemoryAdapter,
    layer: int,
    prefixes: list[tuple[int, ...]],
    pair_seq: Int[Tensor, " pairs"],
    pair_key: Int[Tensor, " pairs"],
    batch_tokens: int,
) -> Tensor:
    """``m[key]`` at the last real position of each pair's sequence, in length-sorted padded batches."""
    out = torch.zeros(pair_seq.numel(), dtype=torch.float64)
    if not prefixes:
        return out
    order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]))
    slot = torch.empty(len(prefixes), dtype=torch.int64)
    slot[torch.as_tensor(order)] = torch.arange(len(prefixes))
    pair_slot = slot[pair_seq]
    perm = torch.argsort(pair_slot, stable=True)
    sorted_slot = pair_slot[perm]
    pad, dev = pad_token(adapter), adapter.device
    for start, end in batch_bounds([len(prefixes[i]) for i in order], batch_tokens):
        tokens, mask = padded([prefixes[i] for i in order[start:end]], pad)
        with torch.no_grad():
            m = adapter.coefficients(tokens.to(dev), layers=[layer], attention_mask=mask.to(dev))[layer]
        last = m[torch.arange(len(tokens), device=m.device), (mask.sum(1) - 1).to(m.device)].double().cpu()
        lo, hi = torch.searchsorted(sorted_slot, torch.tensor([start, end])).tolist()
        sel = perm[lo:hi]
        out[sel] = last[pair_slot[sel] - start, pair_key[sel]]
    return out


# -- the shared strategy: a few variant sequences per unit, each run once -----------------------
@dataclass
class _Variants:
    """The variant sequences and, per requested coefficient, which variant and position to read."""

    seqs: list[tuple[int, ...]]
    kinds: dict[str, int]
    need_len: np.ndarray
    need_layer: np.ndarray
    req_var: np.ndarray
    req_pos: np.ndarray


def _plan_shared(ex: Examples) -> _Variants:
    """Map each example's four prefixes to a position of a variant sequence (see the module doc).

    Own tokens ``t_0 .. t_p`` of unit ``u``, ``h`` = 1 with BOS else 0: orig reads position ``h + p``
    of ``u``; last reads ``h + p - 1`` of ``u``; first reads ``h + p - 1`` of ``u`` without ``t_0``;
    random (``t_j`` removed) reads ``h + p - 1`` of ``u`` without ``t_j`` (that is ``u`` itself when
    ``j == p``, and ``u`` without ``t_0`` when ``j == 0``).
    """
    index: dict[tuple[int, ...], int] = {}
    by_removal: dict[tuple[int, int], int] = {}

    def variant(unit: int, removed: int) -> int:
        if (unit, removed) not in by_removal:
            own = ex.units[unit]
            seq = ex.head + (own if removed < 0 else own[:removed] + own[removed + 1 :])
            by_removal[unit, removed] = index.setdefault(seq, len(index))
        return by_removal[unit, removed]

    h, n = len(ex.head), len(ex)
    req_var, req_pos = np.zeros((n, 4), dtype=np.int64), np.zeros((n, 4), dtype=np.int64)
    for i, (unit, p, j) in enumerate(zip(*(ex.rows[f] for f in ("unit_id", "position", "random_index")), strict=True)):
        whole, first = variant(unit, -1), variant(unit, 0)
        req_var[i] = (whole, first, whole, whole if j == p else first if j == 0 else variant(unit, j))
        req_pos[i] = (h + p, h + p - 1, h + p - 1, h + p - 1)
    need_len = np.zeros(len(index), dtype=np.int64)
    np.maximum.at(need_len, req_var.ravel(), req_pos.ravel() + 1)
    need_layer = np.full(len(index), -1, dtype=np.int64)
    np.maximum.at(need_layer, req_var.ravel(), np.repeat(np.asarray(ex.rows["layer"], dtype=np.int64), 4))
    kinds = {"whole": 0, "first": 0, "random": 0}
    for _, removed in by_removal:
        kinds["whole" if removed < 0 else "first" if removed == 0 else "random"] += 1
    return _Variants(list(index), kinds, need_len, need_layer, req_var.ravel(), req_pos.ravel())


def run_shared(adapter: MemoryAdapter, ex: Examples, batch_tokens: int, progress: bool) -> tuple[np.ndarray, dict]:
    """``[examples, 4]`` coefficients (orig, first, last, random) from one forward per variant."""
    from tqdm.auto import tqdm

    plan = _plan_shared(ex)
    order = np.lexsort((plan.need_layer, plan.need_len))  # by length, then deepest layer needed
    slot = np.empty_like(order)
    slot[order] = np.arange(len(order))
    req_slot = slot[plan.req_var]
    perm = np.argsort(req_slot, kind="stable")
    sorted_slot = req_slot[perm]
    req_layer = np.repeat(np.asarray(ex.rows["layer"], dtype=np.int64), 4)
    req_key = np.repeat(np.asarray(ex.rows["key"], dtype=np.int64), 4)
    lengths, depths = plan.need_len[order], plan.need_layer[order]
    bounds = cheapest_bounds(lengths, depths, batch_tokens)
    stats: dict[str, Any] = {
        "strategy": "shared",
        "variants": len(plan.seqs),
        "variants_by_kind": plan.kinds,
        "units": len(set(ex.rows["unit_id"])),
        "requested_sequences": 4 * len(ex),
        "tokens": int(lengths.sum()),
        "padded_tokens": int(sum((e - s) * int(lengths[s:e].max()) for s, e in bounds)),
        "token_layers": int((lengths * (depths + 1)).sum()),
        "forwards": len(bounds),
    }
    log.info(
        "mutation test (shared): %d variant sequences, %d tokens, %d tokens x layers in %d forward passes",
        stats["variants"],
        stats["tokens"],
        stats["token_layers"],
        stats["forwards"],
    )
    values = np.zeros(4 * len(ex))
    start_time = time.perf_counter()
    with tqdm(
        total=stats["token_layers"], desc="mutation test", unit="tok*layer", unit_scale=True, disable=not progress
    ) as bar:
        for start, end in bounds:
            lo, hi = np.searchsorted(sorted_slot, [start, end])
            sel = perm[lo:hi]
            rows = [plan.seqs[v][: plan.need_len[v]] for v in order[start:end].tolist()]
            where = (req_slot[sel] - start, plan.req_pos[sel], req_key[sel])
            values[sel] = _gather(adapter, rows, req_layer[sel], where, int(depths[start:end].max()))
            bar.update(int((lengths[start:end] * (depths[start:end] + 1)).sum()))
    stats["seconds"] = round(time.perf_counter() - start_time, 3)
    return values.reshape(-1, 4), stats


def _gather(
    adapter: MemoryAdapter,
    rows: list[tuple[int, ...]],
    layers: np.ndarray,
    where: tuple[np.ndarray, np.ndarray, np.ndarray],
    deepest: int,
) -> np.ndarray:
    """One forward pass of ``rows`` (right-padded) up to layer ``deepest``: ``m[row, pos, key]``.

    Each request is read at its layer inside the hook, so no layer's whole activation is kept.
    """
    tokens, mask = padded(rows, pad_token(adapter))
    dev = adapter.device
    out = np.zeros(len(layers))
    fired: set[str] = set()

    def reader(chosen: np.ndarray) -> Any:
        index = tuple(torch.as_tensor(w[chosen], device=dev) for w in where)

        def read(tensor: Tensor, hook: Any) -> None:
            out[chosen] = tensor[index].double().cpu().numpy()
            fired.add(hook.name)

        return read

    hooks = [
        (adapter.hook_names(int(layer)).coefficients, reader(np.nonzero(layers == layer)[0]))
        for layer in np.unique(layers)
    ]
    with torch.no_grad():
        adapter.run_with_hooks(
            tokens.to(dev), hooks, attention_mask=mask.to(dev), stop_after=adapter.hook_names(deepest).coefficients
        )
    missing = [name for name, _ in hooks if name not in fired]
    if missing:
        raise HookNotFiredError(
            f"These hooks did not fire during the mutation test's forward pass: {missing}. Please report the "
            "model and TransformerLens version; strategy='prefix' avoids this code path."
        )
    return out
