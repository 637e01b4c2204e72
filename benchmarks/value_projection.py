"""``project_values`` with the Numba row statistics against the torch reference, in the same run.

Projects every value of the requested layers (top_k=10, ranks of one target token per memory and
sign, as ``ffkv-lens run`` does for the agreement) with ``FFKV_LENS_KERNELS=reference`` and with the
Numba twin, alternately, and checks that token ids, logits and ranks are identical and ``max_prob``
agrees within float32 rounding. Reports each implementation's wall times, medians and their ratio.

Usage:
    HF_HUB_OFFLINE=1 python benchmarks/value_projection.py --model gemma3-270m --out values.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import ffkv_lens as fk  # noqa: E402
from ffkv_lens.analysis.values import project_values  # noqa: E402
from ffkv_lens.kernels import KERNELS_ENV  # noqa: E402

IMPLEMENTATIONS = ("reference", "numba")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="default: all")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=10)
    return parser.parse_args(argv)


def compare(a, b) -> dict:
    """Exact equality of ids, logits and ranks; largest relative difference of max_prob."""
    same = all(
        torch.equal(getattr(a, name)[layer], getattr(b, name)[layer])
        for name in ("top_ids", "top_logits", "bottom_ids", "bottom_logits")
        for layer in a.layers
    )
    ranks = all(torch.equal(a.target_ranks[s][layer], b.target_ranks[s][layer]) for s in (1, -1) for layer in a.layers)
    rel = max(float(((a.max_prob[l] - b.max_prob[l]).abs() / b.max_prob[l]).max()) for l in a.layers)  # noqa: E741
    return {"ids_and_logits_equal": same, "ranks_equal": ranks, "max_prob_max_rel_diff": rel}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lens = fk.MemoryLens(fk.load_model(args.model))
    layers = args.layers if args.layers else list(range(lens.n_layers))
    g = torch.Generator().manual_seed(0)
    draw = lambda: torch.randint(0, lens.d_vocab, (lens.d_mlp,), generator=g)  # noqa: E731
    targets = {s: {layer: draw() for layer in layers} for s in (1, -1)}
    times: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    results = {}
    for rep in range(args.reps):
        order = IMPLEMENTATIONS if rep % 2 == 0 else IMPLEMENTATIONS[::-1]
        for name in order:
            os.environ[KERNELS_ENV] = name
            start = time.perf_counter()
            results[name] = project_values(lens, top_k=args.top_k, layers=layers, rank_targets=targets)
            times[name].append(time.perf_counter() - start)
            print(f"rep {rep} {name}: {times[name][-1]:.1f} s", flush=True)  # noqa: T201
    med = {name: statistics.median(t) for name, t in times.items()}
    out = {
        "model": args.model,
        "layers": layers,
        "memories": lens.d_mlp * len(layers),
        "d_vocab": lens.d_vocab,
        "top_k": args.top_k,
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seconds": times,
        "median_seconds": med,
        "speedup_numba_vs_reference": med["reference"] / med["numba"],
        **compare(results["numba"], results["reference"]),
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
