"""Trigger search throughput against the bare forward pass and the naive TransformerLens recipe.

On the same batches of the default corpus (8 x 128-token windows, k=50, all layers), in one
process, with the three methods interleaved batch by batch and repeated:

(a) forward: the bare forward stopped after the last layer's coefficients (the limit);
(b) search:  ``TriggerSearch.update`` (hooks reduce in place, threshold-gated top-k);
(c) naive:   ``run_with_cache`` of every ``hook_post``, then concat + ``torch.topk`` per layer, keeping
             each unit's peak position (``max`` with indices) as a trigger example needs; also timed
             without the positions (``naive_values_only``, a lower bound on the recipe's cost).

With ``--stats``, a fourth method runs in the same rotation:

(d) search_stats: ``TriggerSearch.update`` with the per-memory statistics (docs/triggers.md), the
    default of ``search_triggers``; (b) then runs with ``stats=False``. The calibration pass that sets
    the histogram ranges runs once, before timing (it reads 64 units, not the corpus).

Peak RSS of a whole ``search_triggers`` over N and 4N tokens is measured in fresh subprocesses.

Usage:
    python benchmarks/trigger_search.py --model smollm2-135m --tokens 8192 --out bench.json
    python benchmarks/trigger_search.py --stats --no-rss --tokens 8192 --out bench_stats.json
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batches(lens, n_tokens: int, batch_units: int, window: int) -> list:
    from ffkv_lens.corpus import Corpus, iter_batches, iter_units

    units = iter_units(Corpus.default(), lens.adapter.tokenizer, unit="window", max_len=window, max_tokens=n_tokens)
    full = [u for u in units if len(u.token_ids) == window]
    return list(iter_batches(full, batch_units=batch_units, bos_token_id=lens.adapter.bos_token_id))


def forward_only(lens, batch) -> None:
    adapter = lens.adapter
    stop = adapter.hook_names(lens.n_layers - 1).coefficients
    adapter.run_with_hooks(batch.tokens.to(adapter.device), [], attention_mask=batch.attention_mask, stop_after=stop)


class Naive:
    """The recipe a TransformerLens user writes today: cache every hook_post, then topk per batch.

    With ``positions`` (the default, what a trigger example needs) each unit's peak position is kept
    too (``max`` with indices, gathered along); without, only the values (a lower bound on its cost).
    Neither breaks ties by unit id.
    """

    def __init__(self, lens, k: int, positions: bool = True) -> None:
        self.lens, self.k, self.positions = lens, k, positions
        self.names = [lens.hook_names(layer).coefficients for layer in range(lens.n_layers)]
        d, dev = lens.d_mlp, lens.adapter.device
        self.values = [torch.full((d, k), float("-inf"), device=dev) for _ in self.names]
        self.units = [torch.full((d, k), -1, dtype=torch.long, device=dev) for _ in self.names]
        self.peaks = [torch.full((d, k), -1, dtype=torch.long, device=dev) for _ in self.names]

    def update(self, batch) -> None:
        model = self.lens.adapter.model
        tokens = batch.tokens.to(self.lens.adapter.device)
        _, cache = model.run_with_cache(tokens, names_filter=self.names, attention_mask=batch.attention_mask)
        mask = batch.attention_mask.bool().to(tokens.device)
        mask[:, 0] = False
        ids = batch.unit_ids.to(tokens.device)
        for i, name in enumerate(self.names):
            masked = cache[name].masked_fill(~mask[..., None], float("-inf"))
            if self.positions:
                m, pos = masked.max(dim=1)
                m, pos = m.T, pos.T  # [d_mlp, batch]
            else:
                m = masked.amax(dim=1).T
            vals = torch.cat([self.values[i], m], dim=1)
            units = torch.cat([self.units[i], ids.expand(m.shape[0], -1)], dim=1)
            top = torch.topk(vals, self.k, dim=1)
            self.values[i], self.units[i] = top.values, units.gather(1, top.indices)
            if self.positions:
                self.peaks[i] = torch.cat([self.peaks[i], pos], dim=1).gather(1, top.indices)


def stats_search(lens, config, ranges: dict | None = None):
    """A ``TriggerSearch`` with the default statistics, its ranges calibrated (or given)."""
    from ffkv_lens.analysis.triggers import TriggerSearch
    from ffkv_lens.corpus import Corpus
    from ffkv_lens.distributed import world

    search = TriggerSearch(lens.adapter, config, {"name": "bench"})
    if ranges is None:
        search.memory_stats.calibrate(lens.adapter, Corpus.default(), config, world())
    else:
        search.memory_stats.ranges = ranges
    return search


def interleaved(lens, batches, k: int, reps: int, stats: bool = False) -> dict:
    from ffkv_lens.analysis.stats.settings import StatsSettings
    from ffkv_lens.analysis.triggers import SearchConfig, TriggerSearch

    device = lens.adapter.device
    tokens = sum(int(b.lengths.sum()) for b in batches)
    rates = {"forward": [], "search": [], "naive": [], "naive_values_only": []}
    if stats:
        rates["search_stats"] = []
    config = SearchConfig(k=k, unit="window", max_len=128)
    ranges = stats_search(lens, config).memory_stats.ranges if stats else None
    for rep in range(reps):
        search = TriggerSearch(lens.adapter, config, {"name": "bench"}, stats=StatsSettings(stats=False))
        naive, values_only = Naive(lens, k), Naive(lens, k, positions=False)
        spent = dict.fromkeys(rates, 0.0)
        runners = {
            "forward": lambda b: forward_only(lens, b),
            "search": search.update,
            "naive": naive.update,
            "naive_values_only": values_only.update,
        }
        if stats:
            with_stats = stats_search(lens, config, ranges)
            runners["search_stats"] = with_stats.update
        for i, batch in enumerate(batches):
            order = list(runners)[i % len(runners) :] + list(runners)[: i % len(runners)]  # rotate who goes first
            for name in order:
                _sync(device)
                start = time.perf_counter()
                runners[name](batch)
                _sync(device)
                spent[name] += time.perf_counter() - start
        start = time.perf_counter()
        search.flush()  # candidates still grouped for merging (CPU) count as search time
        _sync(device)
        spent["search"] += time.perf_counter() - start
        if stats:
            start = time.perf_counter()
            with_stats.flush()
            spent["search_stats"] += time.perf_counter() - start
        for name in rates:
            rates[name].append(tokens / spent[name])
        print(f"rep {rep}: " + ", ".join(f"{n} {r[-1]:.0f} tok/s" for n, r in rates.items()), file=sys.stderr)
    return rates


RSS_SCRIPT = """
import resource, sys, torch
import ffkv_lens as fk
from ffkv_lens.corpus import Corpus
torch.set_num_threads({threads})
lens = fk.MemoryLens(fk.load_model({model!r}, device={device!r}))
lens.search_triggers(Corpus.default(), unit="window", max_len=128, max_tokens={tokens}, k=50, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mb(model: str, device: str, tokens: int) -> float:
    script = RSS_SCRIPT.format(model=model, device=device, tokens=tokens, threads=torch.get_num_threads())
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per repetition (N)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--stats", action="store_true", help="also time the search with per-memory statistics")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    import ffkv_lens as fk
    from ffkv_lens.analysis.stats.settings import StatsSettings
    from ffkv_lens.analysis.triggers import SearchConfig, TriggerSearch
    from ffkv_lens.kernels import active_implementation

    lens = fk.MemoryLens(fk.load_model(args.model, device=args.device))
    batches = make_batches(lens, args.tokens, batch_units=8, window=128)
    with torch.no_grad():
        for batch in batches[:1]:  # warm-up (allocator, compiled kernels loaded from their cache)
            forward_only(lens, batch)
            config = SearchConfig(k=args.k, unit="window", max_len=128)
            warm = TriggerSearch(lens.adapter, config, {"name": "warm-up"}, stats=StatsSettings(stats=False))
            warm.update(batch)
            warm.flush()
            if args.stats:  # compiles (or loads) the statistics kernel
                stats_search(lens, config).update(batch)
        rates = interleaved(lens, batches, args.k, args.reps, stats=args.stats)
    med = {name: statistics.median(values) for name, values in rates.items()}
    # Each repetition interleaves the three methods batch by batch, so its ratios compare them under the
    # same machine conditions; the machine's speed drifts between repetitions (shared host).
    per_rep = {
        other: [s / o for s, o in zip(rates["search"], rates[other], strict=True)]
        for other in ("forward", "naive", "naive_values_only")
    }
    result = {
        "model": args.model,
        "device": args.device,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tokens": sum(int(b.lengths.sum()) for b in batches),
        "batch": f"8 x 128 tokens (windows of the default corpus), k={args.k}, all {lens.n_layers} layers",
        "reps": args.reps,
        "tokens_per_s_forward": med["forward"],
        "tokens_per_s_search": med["search"],
        "tokens_per_s_naive": med["naive"],
        "ratio_vs_forward": statistics.median(per_rep["forward"]),
        "ratio_vs_naive": statistics.median(per_rep["naive"]),
        "tokens_per_s_naive_values_only": med["naive_values_only"],
        "ratio_vs_naive_values_only": statistics.median(per_rep["naive_values_only"]),
        "ratios_per_repetition": per_rep,
        "ratio_definition": "median over repetitions of (search tok/s / other tok/s) within the repetition",
        "ratio_of_medians_vs_forward": med["search"] / med["forward"],
        "ratio_of_medians_vs_naive": med["search"] / med["naive"],
        "kernels": active_implementation(args.device),
        "raw_tokens_per_s": rates,
    }
    if args.stats:
        ratios = [w / s for w, s in zip(rates["search_stats"], rates["search"], strict=True)]
        result.update(
            tokens_per_s_search_stats=med["search_stats"],
            ratio_stats_vs_search=statistics.median(ratios),
            ratio_stats_vs_search_per_repetition=ratios,
            stats_settings=StatsSettings().to_dict(),
        )
    if not args.no_rss:
        small, large = (
            peak_rss_mb(args.model, args.device, args.tokens),
            peak_rss_mb(args.model, args.device, 4 * args.tokens),
        )
        result.update(peak_rss_small_mb=small, peak_rss_large_mb=large, rss_growth=large / small)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "raw_tokens_per_s"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
