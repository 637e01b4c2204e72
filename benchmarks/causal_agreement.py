"""Batched ablations against one ablation per forward pass, on the same (memory, trigger example) pairs.

The pairs are those :func:`ffkv_lens.analysis.causal_agreement` measures: sampled memories of a
few layers and their top trigger examples (prefixes cut at the peak, BOS first), each ablated at
the peak. In one process, repetitions interleave the two methods layer by layer:

(a) batched: :func:`ffkv_lens.analysis.causal.ablate` (a clean pass per distinct prefix, then many
    pairs per forward pass, each row zeroing its own memory at its own position);
(b) one by one: :func:`ffkv_lens.analysis.causal.ablate_one_by_one` (per pair a clean and an
    ablated forward pass of its prefix alone, the ablation an ``Edit`` under ``intervene``).

Both must give the same numbers (max absolute difference of log p and of every effect reported);
the speed-up is the median over repetitions of (one-by-one seconds / batched seconds).

Usage:
    python benchmarks/causal_agreement.py --model smollm2-135m --atlas ATLAS_DIR --out bench.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pairs(lens, atlas, layers: list[int], keys: int, examples: int) -> dict:
    from ffkv_lens.analysis.causal.agreement import CausalConfig, _bos, _plan

    config = CausalConfig(keys_per_layer=keys, examples=examples)
    head = _bos(lens.adapter, atlas)
    out = {}
    for layer in layers:
        plan = _plan(atlas, layer, config, head)
        targets = torch.tensor(plan.rows["next"])[:, None].expand(-1, 2).clone()
        targets[:, 1] = 0  # a second target column, as causal_agreement reads two tokens per pair
        out[layer] = (plan.prefixes, torch.tensor(plan.rows["prefix"]), torch.tensor(plan.rows["key"]), targets)
    return out


def _timed(fn, device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--atlas", type=Path, help="a saved TriggerAtlas of the model (default: search one)")
    parser.add_argument("--tokens", type=int, default=5000, help="trigger-search tokens when --atlas is not given")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="default: first, middle, last")
    parser.add_argument("--keys", type=int, default=4, help="memories per layer")
    parser.add_argument("--examples", type=int, default=3, help="top trigger examples per memory")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    import ffkv_lens as fk
    from ffkv_lens.analysis.atlas import TriggerAtlas
    from ffkv_lens.analysis.causal import ablate, ablate_one_by_one

    lens = fk.MemoryLens(fk.load_model(args.model, device=args.device))
    if args.atlas is not None:
        atlas = TriggerAtlas.load(args.atlas)
    else:
        atlas = lens.search_triggers(fk.Corpus.default(), max_tokens=args.tokens, k=max(args.examples, 5))
    layers = args.layers or sorted({0, lens.n_layers // 2, lens.n_layers - 1})
    pairs = _pairs(lens, atlas, layers, args.keys, args.examples)
    device, adapter = lens.adapter.device, lens.adapter
    seconds: dict[str, list[float]] = {"batched": [], "one_by_one": []}
    worst = {name: 0.0 for name in ("clean_logp", "total", "direct", "direct_logit_frozen", "coefficient")}
    with torch.no_grad():
        first = next(iter(pairs.values()))
        ablate(adapter, layers[0], first[0], first[1][:2], first[2][:2], first[3][:2])  # warm-up
        for _ in range(args.reps):
            spent = {"batched": 0.0, "one_by_one": 0.0}
            for layer, (prefixes, index, keys, targets) in pairs.items():
                work = (adapter, layer, prefixes, index, keys, targets)
                t_batch, batched = _timed(partial(ablate, *work, batch_tokens=args.batch_tokens), device)
                t_one, one = _timed(partial(ablate_one_by_one, *work, frozen_from_contributions=False), device)
                spent["batched"] += t_batch
                spent["one_by_one"] += t_one
                for name in worst:
                    diff = float((getattr(batched, name) - getattr(one, name)).abs().max())
                    worst[name] = max(worst[name], diff)
            for name, value in spent.items():
                seconds[name].append(value)
    n_pairs = sum(len(p[1]) for p in pairs.values())
    ratios = [o / b for o, b in zip(seconds["one_by_one"], seconds["batched"], strict=True)]
    result = {
        "model": args.model,
        "device": args.device,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "layers": layers,
        "pairs": n_pairs,
        "distinct_prefixes": sum(len(p[0]) for p in pairs.values()),
        "mean_prefix_tokens": statistics.mean(len(x) for p in pairs.values() for x in p[0]),
        "reps": args.reps,
        "batch_tokens": args.batch_tokens,
        "seconds_batched": statistics.median(seconds["batched"]),
        "seconds_one_by_one": statistics.median(seconds["one_by_one"]),
        "pairs_per_s_batched": n_pairs / statistics.median(seconds["batched"]),
        "pairs_per_s_one_by_one": n_pairs / statistics.median(seconds["one_by_one"]),
        "speedup": statistics.median(ratios),
        "speedup_per_repetition": ratios,
        "speedup_definition": "median over repetitions of (one-by-one seconds / batched seconds) within the repetition",
        "max_abs_difference": worst,
        "raw_seconds": seconds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "raw_seconds"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
