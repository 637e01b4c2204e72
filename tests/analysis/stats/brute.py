"""The per-memory statistics by brute force: every unit alone, every coefficient materialised.

Shared by the statistics tests. The definitions are those of docs/triggers.md ("Per-memory
statistics"): bins by ``floor((m - lo) * bins / (hi - lo))`` clamped, quantile groups by the middle of
each bin's share, samples as the ``R`` lowest priorities of a group.
"""

import torch

from ffkv_lens.analysis.stats.settings import bin_range
from ffkv_lens.corpus import iter_units
from ffkv_lens.kernels.memory_stats import layer_salt, priorities


def corpus_units(lens, corpus, *, unit, max_len, max_tokens=None):
    """The search's unit stream."""
    return list(iter_units(corpus, lens.adapter.tokenizer, unit=unit, max_len=max_len, max_tokens=max_tokens))


def coefficients(lens, units, *, layers, exclude_bos=True):
    """``{layer: (m [n, d_mlp] float64, units [n], positions [n] raw)}`` over every candidate position."""
    bos = lens.adapter.bos_token_id
    parts = {layer: ([], [], []) for layer in layers}
    for u in units:
        ids = ([bos] if bos is not None else []) + list(u.token_ids)
        with torch.no_grad():
            coeffs = lens.coefficients(torch.tensor([ids]), layers=layers)
        start = 1 if (bos is not None and exclude_bos) else 0
        for layer in layers:
            m = coeffs[layer][0].double()[start:]
            parts[layer][0].append(m)
            parts[layer][1].append(torch.full((m.shape[0],), u.unit_id))
            parts[layer][2].append(torch.arange(start, start + m.shape[0]))
    return {layer: tuple(torch.cat(p) for p in ps) for layer, ps in parts.items()}


def calibration_ranges(lens, units, *, layers, calibration_units, exclude_bos=True):
    """Each layer's range from the first ``calibration_units`` units, by the documented rule."""
    seen = coefficients(lens, units[:calibration_units], layers=layers, exclude_bos=exclude_bos)
    return {layer: bin_range(float(m.min()), float(m.max())) for layer, (m, _, _) in seen.items()}


def expected_stats(m, units, positions, *, layer, lo, hi, bins, groups, samples, threshold, seed=0):
    """Every statistic of one layer from its materialised coefficients."""
    n, d_mlp = m.shape
    b = torch.floor((m - lo) * (bins / (hi - lo))).clamp(0, bins - 1).long()
    hist = torch.zeros(d_mlp, bins, dtype=torch.int64)
    for key in range(d_mlp):
        hist[key] = torch.bincount(b[:, key], minlength=bins)
    out = {
        "count": n, "sums": m.sum(0), "squares": (m * m).sum(0), "active": (m.abs() > threshold).sum(0),
        "minimum": m.amin(0), "maximum": m.amax(0), "hist": hist,
        "outside": torch.stack([(m < lo).sum(0), (m > hi).sum(0)], 1),
    }  # fmt: skip
    prio = priorities(layer_salt(seed, layer), units, positions, d_mlp)
    sampled = {}
    for key in range(d_mlp):
        total, before = int(hist[key].sum()), 0
        group_of_bin = []
        for c in hist[key].tolist():
            group_of_bin.append(min(groups - 1, (groups * (2 * before + c)) // (2 * max(total, 1))))
            before += c
        g = torch.tensor(group_of_bin)[b[:, key]]
        for group in range(groups):
            rows = (g == group).nonzero().squeeze(1)
            rows = rows[torch.argsort(prio[rows, key], stable=True)][:samples]
            sampled[(key, group)] = [(int(units[r]), int(positions[r]), float(m[r, key])) for r in rows]
        out.setdefault("group_count", []).append(torch.bincount(g, minlength=groups))
    out["group_count"] = torch.stack(out["group_count"])
    out["samples"] = sampled
    return out
