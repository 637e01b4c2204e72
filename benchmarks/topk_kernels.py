"""Micro-benchmark of the streaming top-k kernels against the naive recipe, in the same run.

Times, per batch of ``batch`` units x ``pos`` tokens x ``d_mlp`` keys (defaults: SmolLM2's 8 x 128 x 1536,
k = 50):

- ``reduce_units``: ffkv_lens vs ``masked_fill(-inf).max(dim=1)``.
- ``merge_cold``: merging into an empty state (every candidate passes) vs concat + ``torch.topk``.
- ``merge_warm_none``: a warm state that no candidate beats (the common case on a real corpus).
- ``merge_warm_few``: a warm state that about 0.1% of the (unit, key) candidates beat.
- ``update_warm_none``: ``update_topk`` (reduce + merge) on the warm state vs naive reduce + naive merge.

Medians (and minima) in microseconds after a warm-up, device synchronised around every call, ours and
the naive recipe called alternately. The naive
recipe is the baseline, not a twin: ``torch.topk`` does not break ties by unit id.

Usage:
    python benchmarks/topk_kernels.py --out topk.json [--threads 2] [--device cpu]
"""

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ffkv_lens import kernels  # noqa: E402
from ffkv_lens.kernels import TopKState  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=128)
    parser.add_argument("--d-mlp", type=int, default=1536)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--fresh-repeats", type=int, default=30, help="repeats of cases needing a fresh state")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict[str, Callable[[int], object]], warmup: int, repeats: int, device: torch.device) -> dict:
    """Median and min wall time (microseconds) of each ``fn(i)``, i in range(repeats), after warm-up.

    The functions alternate call by call, so that load from other processes hits them alike.
    """
    for i in range(warmup):
        for fn in fns.values():
            fn(i)
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup, warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(i)
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e6)
    return {
        name: {"median_us": statistics.median(t), "min_us": min(t), "repeats": repeats} for name, t in times.items()
    }


def naive_reduce(m: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return m.masked_fill(~valid.unsqueeze(-1), float("-inf")).max(dim=1)


def naive_merge(state: TopKState, values: torch.Tensor, positions: torch.Tensor, unit_ids: torch.Tensor) -> TopKState:
    """Concatenate state and candidates, ``torch.topk``, gather (no threshold, no unit tie-break)."""
    d_mlp, batch = state.d_mlp, unit_ids.shape[0]
    all_values = torch.cat([state.values, values.T], dim=1)
    top = all_values.topk(state.k, dim=1)
    units = torch.cat([state.units, unit_ids.expand(d_mlp, batch)], dim=1).gather(1, top.indices)
    positions = torch.cat([state.positions, positions.T], dim=1).gather(1, top.indices)
    return TopKState(top.values, units, positions)


def warm_state(d_mlp: int, k: int, level: float, device: torch.device, g: torch.Generator) -> TopKState:
    """A full state whose rows hold values >= ``level`` (sorted), unit ids from 10**6 on."""
    values = (level + torch.randn(d_mlp, k, generator=g).abs()).sort(dim=1, descending=True).values
    units = torch.arange(10**6, 10**6 + d_mlp * k).view(d_mlp, k)
    return TopKState(values.to(device), units.to(device), torch.zeros(d_mlp, k, dtype=torch.int64, device=device))


def pair(
    name: str,
    ours: Callable[[int], object],
    naive: Callable[[int], object],
    args: argparse.Namespace,
    device: torch.device,
    repeats: int,
) -> dict:
    row = measure({"ffkv_lens": ours, "naive": naive}, args.warmup, repeats, device)
    row["speedup_median"] = row["naive"]["median_us"] / row["ffkv_lens"]["median_us"]
    print(
        f"{name:18s} ffkv_lens {row['ffkv_lens']['median_us']:9.1f} us   naive {row['naive']['median_us']:9.1f} us"
        f"   x{row['speedup_median']:.1f}"
    )
    return row


def fresh(make: Callable[[], TopKState], n: int) -> list[TopKState]:
    return [make() for _ in range(n)]


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    b, p, d, k = args.batch, args.pos, args.d_mlp, args.k
    m = torch.randn(b, p, d, generator=g).to(device)
    lengths = torch.randint(p // 2, p + 1, (b,), generator=g)
    valid = (torch.arange(p) < lengths[:, None]).to(device)
    valid[:, 0] = False  # BOS excluded
    ids = torch.randperm(10**5, generator=g)[:b].to(device)
    peaks = kernels.reduce_units(m, valid)
    cand = (peaks.values, peaks.positions, ids)
    n_fresh = args.warmup + args.fresh_repeats
    results = {}
    results["reduce_units"] = pair(
        "reduce_units", lambda i: kernels.reduce_units(m, valid), lambda i: naive_reduce(m, valid), args, device,
        args.repeats,
    )  # fmt: skip
    cold = fresh(lambda: TopKState.empty(d, k, device=device), n_fresh)
    cold_naive = fresh(lambda: TopKState.empty(d, k, device=device), n_fresh)
    results["merge_cold"] = pair(
        "merge_cold", lambda i: kernels.merge_topk(cold[i], *cand), lambda i: naive_merge(cold_naive[i], *cand), args,
        device, args.fresh_repeats,
    )  # fmt: skip
    none = warm_state(d, k, 10.0, device, g)
    results["merge_warm_none"] = pair(
        "merge_warm_none", lambda i: kernels.merge_topk(none, *cand), lambda i: naive_merge(none, *cand), args, device,
        args.repeats,
    )  # fmt: skip
    few_level = float(torch.quantile(peaks.values.float().cpu().flatten(), 0.999))
    few = fresh(lambda: warm_state(d, k, few_level, device, g), n_fresh)
    few_naive = fresh(lambda: warm_state(d, k, few_level, device, g), n_fresh)
    passing = int((peaks.values > few[0].values[:, -1]).sum())
    results["merge_warm_few"] = pair(
        "merge_warm_few", lambda i: kernels.merge_topk(few[i], *cand), lambda i: naive_merge(few_naive[i], *cand), args,
        device, args.fresh_repeats,
    )  # fmt: skip
    results["merge_warm_few"]["passing_candidates"] = passing
    results["update_warm_none"] = pair(
        "update_warm_none", lambda i: kernels.update_topk(none, m, valid, ids),
        lambda i: naive_merge(none, *naive_reduce(m, valid), ids), args, device, args.repeats,
    )  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = run(args)
    report = {
        "benchmark": "topk_kernels",
        "sizes": {"batch": args.batch, "pos": args.pos, "d_mlp": args.d_mlp, "k": args.k},
        "implementation": kernels.active_implementation(args.device),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
