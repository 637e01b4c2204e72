"""How the mutation test gets its coefficients: the examples, the random-token rule, two strategies.

- :func:`collect_examples` samples the keys, cuts each trigger example at its peak and draws the
  token a ``random`` mutation removes (:func:`random_token_index`, one seeded permutation per unit).
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

from ffkv_lens.errors import HookNotFiredError

__all__ = [
    "ROW_FIELDS",
    "Examples",
    "batch_bounds",
    "cheapest_bounds",
    "collect_examples",
    "random_token_index",
    "run_prefix",
    "run_shared",
    "unit_order",
]

log = logging.getLogger(__name__)

# Independent random streams: keys per (seed, layer); random tokens per (seed, unit).
KEYS_STREAM, TOKENS_STREAM = 0, 1
ROW_FIELDS = ("layer", "key", "rank", "unit_id", "position", "m_atlas", "random_index", "n_own_tokens")
# Order of the four measured coefficients of an example.
MEASURED = ("m_orig", "m_first", "m_last", "m_random")


@dataclass
class Examples:
    """Every measured example of the tested layers, in layer, key, rank order.

    Attributes:
        rows: Column lists named by :data:`ROW_FIELDS`.
        skipped_short: ``{layer: {key: examples skipped for fewer than 2 own tokens}}``.
        units: Own tokens (no BOS) of every unit an example uses.
        head: ``(bos,)`` when the atlas was searched with BOS, else ``()``.
    """

    rows: dict[str, list[Any]]
    skipped_short: dict[int, dict[int, int]]
    units: dict[int, tuple[int, ...]]
    head: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.rows["key"])


def random_token_index(order: np.ndarray, n: int) -> int:
    """The own token a ``random`` mutation of an ``n``-token prefix removes.

    ``order`` is the unit's seeded permutation of ``range(len(unit))``; the index removed is its
    first entry below ``n``. For a uniform permutation this is uniform on ``[0, n)`` (by symmetry,
    each of ``0 .. n - 1`` is equally likely to come first among them), and all prefixes of a unit
    share few distinct removals (the running minima of the permutation, about ``ln(len(unit))``).

    Args:
        order: A permutation of ``0 .. L - 1`` with ``L >= n``.
        n: Own tokens of the prefix, at least 1.

    Returns:
        The removed own-token index, in ``[0, n)``.
    """
    return int(order[int(np.argmax(order < n))])


def unit_order(seed: int, unit_id: int, n_tokens: int) -> np.ndarray:
    """The unit's seeded permutation of its own token indices (independent of layer and key)."""
    return np.random.default_rng([seed, unit_id, TOKENS_STREAM]).permutation(n_tokens)


def collect_examples(atlas: Any, config: Any, layers: list[int], bos: int | None) -> Examples:
    """Sample keys per layer, cut each example at its peak and draw its random token."""
    head = () if bos is None else (bos,)
    out = Examples({name: [] for name in ROW_FIELDS}, {}, {}, head)
    orders: dict[int, np.ndarray] = {}
    for layer in layers:
        table = (atlas.top if config.sign == 1 else atlas.bottom)[layer]
        rng_keys = np.random.default_rng([config.seed, layer, KEYS_STREAM])
        with_examples = torch.nonzero(table.units[:, 0] >= 0).flatten().numpy()
        n_keys = min(config.keys_per_layer, len(with_examples))
        keys = np.sort(rng_keys.choice(with_examples, size=n_keys, replace=False)).tolist()
        n_ex = min(config.examples, table.units.shape[1])
        skipped = out.skipped_short.setdefault(layer, {key: 0 for key in keys})
        fields = (table.units[keys, :n_ex], table.positions[keys, :n_ex], table.values[keys, :n_ex])
        for key, units, positions, values in zip(keys, *(f.tolist() for f in fields), strict=True):
            for rank, (unit, position, m_atlas) in enumerate(zip(units, positions, values, strict=True)):
                if unit < 0:
                    break
                if position < 1:  # fewer than 2 own tokens (position -1: the peak is the BOS)
                    skipped[key] += 1
                    continue
                if unit not in out.units:
                    out.units[unit] = tuple(atlas.units.get(unit)[1])
                    orders[unit] = unit_order(config.seed, unit, len(out.units[unit]))
                j = random_token_index(orders[unit], position + 1)
                row = (layer, key, rank, unit, position, m_atlas, j, position + 1)
                for name, value in zip(ROW_FIELDS, row, strict=True):
                    out.rows[name].append(value)
    return out


def _pad_token(lens: Any) -> int:
    tok = lens.adapter.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def _padded(rows: list[tuple[int, ...]], pad: int) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Right-padded token ids and the attention mask (1 on real tokens)."""
    lengths = torch.tensor([len(r) for r in rows])
    width = int(lengths.max())
    tokens = torch.full((len(rows), width), pad, dtype=torch.int64)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    return tokens, (torch.arange(width) < lengths[:, None]).long()


def batch_bounds(lengths: list[int], batch_tokens: int) -> list[tuple[int, int]]:
    """Split ascending ``lengths`` into runs whose padded size (rows x longest) fits ``batch_tokens``."""
    bounds, start = [], 0
    for i, length in enumerate(lengths):
        if i > start and (i - start + 1) * length > batch_tokens:
            bounds.append((start, i))
            start = i
    if lengths:
        bounds.append((start, len(lengths)))
    return bounds


# Fixed cost of one forward pass in padded tokens per layer run (hook and module-call overhead;
# measured ~5 ms per layer per forward on SmolLM2-135M on 2 CPU cores, ~70 tokens' worth).
FORWARD_OVERHEAD_TOKENS = 64


def cheapest_bounds(lengths: np.ndarray, depths: np.ndarray, batch_tokens: int) -> list[tuple[int, int]]:
    """Split rows, in the given order, into consecutive batches of least modelled cost.

    A batch of rows ``s .. e - 1`` costs ``(max depth + 1) * (rows * max length + FORWARD_OVERHEAD_TOKENS)``
    (padded tokens times layers run, plus a fixed overhead per forward) and holds at most
    ``batch_tokens`` padded tokens unless it is a single row. Exact minimum by dynamic programming
    over the split points; rows sorted by length pad least.
    """
    n = len(lengths)
    window = max(1, batch_tokens // max(1, int(lengths.min()))) if n else 1
    best, start = np.zeros(n + 1), np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        first = max(0, end - window)
        starts = np.arange(first, end)
        depth = np.maximum.accumulate(depths[first:end][::-1])[::-1]
        width = np.maximum.accumulate(lengths[first:end][::-1])[::-1]
        rows = end - starts
        cost = best[first:end] + (depth + 1) * (rows * width + FORWARD_OVERHEAD_TOKENS)
        cost[(rows * width > batch_tokens) & (rows > 1)] = np.inf
        pick = int(np.argmin(cost))
        best[end], start[end] = cost[pick], starts[pick]
    bounds, end = [], n
    while end > 0:
        bounds.append((int(start[end]), end))
        end = int(start[end])
    return bounds[::-1]


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


def run_prefix(lens: Any, ex: Examples, batch_tokens: int, dedupe: bool, progress: bool) -> tuple[np.ndarray, dict]:
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
            values = _last_coefficients(lens, layer, prefixes, torch.as_tensor(seq.reshape(-1)), pair_key, batch_tokens)
            out[rows] = values.reshape(-1, 4).numpy()
            stats["seconds"][layer] = round(time.perf_counter() - start, 3)
            log.info("layer %d: %d sequences in %.1f s", layer, len(prefixes), stats["seconds"][layer])
            bar.update(work[layer])
    return out, stats


def _last_coefficients(
    lens: Any,
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
    pad, dev = _pad_token(lens), lens.adapter.device
    for start, end in batch_bounds([len(prefixes[i]) for i in order], batch_tokens):
        tokens, mask = _padded([prefixes[i] for i in order[start:end]], pad)
        with torch.no_grad():
            m = lens.coefficients(tokens.to(dev), layers=[layer], attention_mask=mask.to(dev))[layer]
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


def run_shared(lens: Any, ex: Examples, batch_tokens: int, progress: bool) -> tuple[np.ndarray, dict]:
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
            values[sel] = _gather(lens, rows, req_layer[sel], where, int(depths[start:end].max()))
            bar.update(int((lengths[start:end] * (depths[start:end] + 1)).sum()))
    stats["seconds"] = round(time.perf_counter() - start_time, 3)
    return values.reshape(-1, 4), stats


def _gather(
    lens: Any,
    rows: list[tuple[int, ...]],
    layers: np.ndarray,
    where: tuple[np.ndarray, np.ndarray, np.ndarray],
    deepest: int,
) -> np.ndarray:
    """One forward pass of ``rows`` (right-padded) up to layer ``deepest``: ``m[row, pos, key]``.

    Each request is read at its layer inside the hook, so no layer's whole activation is kept.
    """
    tokens, mask = _padded(rows, _pad_token(lens))
    adapter, dev = lens.adapter, lens.adapter.device
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
