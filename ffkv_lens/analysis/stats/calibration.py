"""The calibration pass: each layer's histogram range from a fixed first slice of units.

Before the search, the first ``calibration_units`` units of the corpus (the same units for every
batch size, every process and every resume) run through the model in batches of a fixed size
(:data:`~ffkv_lens.analysis.stats.settings.CALIBRATION_BATCH_TOKENS`); each layer's range is
:func:`~ffkv_lens.analysis.stats.settings.bin_range` of the extremes of its coefficients there.
"""

import itertools
from typing import Any

import torch
from torch import Tensor

from ffkv_lens.adapters import MemoryAdapter
from ffkv_lens.analysis.search_config import SearchConfig
from ffkv_lens.analysis.stats.settings import CALIBRATION_BATCH_TOKENS, StatsSettings, bin_range
from ffkv_lens.corpus import Corpus

__all__ = ["calibrate"]


def calibrate(
    adapter: MemoryAdapter, corpus: Corpus, config: SearchConfig, settings: StatsSettings, layers: list[int]
) -> dict[int, tuple[float, float]]:
    """``{layer: (lo, hi)}`` histogram ranges from the first ``settings.calibration_units`` units."""
    from ffkv_lens.corpus import iter_batches, iter_units

    units = iter_units(
        corpus, adapter.tokenizer, unit=config.unit, max_len=config.max_len, max_tokens=config.max_tokens
    )
    tok = adapter.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    first = itertools.islice(units, settings.calibration_units)
    extremes = {layer: [float("inf"), float("-inf")] for layer in layers}
    names = {adapter.hook_names(layer).coefficients: layer for layer in layers}
    batches = iter_batches(first, batch_tokens=CALIBRATION_BATCH_TOKENS, bos_token_id=adapter.bos_token_id,
                           pad_token_id=pad)  # fmt: skip
    for batch in batches:
        valid = batch.attention_mask.bool().to(adapter.device)
        if batch.has_bos and config.exclude_bos:
            valid[:, 0] = False

        def hook(m: Tensor, hook: Any, valid: Tensor = valid) -> None:
            seen = m.detach()[valid].double()
            if seen.numel():
                pair = extremes[names[hook.name]]
                pair[0], pair[1] = min(pair[0], float(seen.min())), max(pair[1], float(seen.max()))

        with torch.no_grad():
            adapter.run_with_hooks(
                batch.tokens.to(adapter.device),
                [(name, hook) for name in names],
                attention_mask=batch.attention_mask.to(adapter.device),
                stop_after=adapter.hook_names(layers[-1]).coefficients,
            )
    return {layer: bin_range(*pair) if pair[0] <= pair[1] else (0.0, 1.0) for layer, pair in extremes.items()}
