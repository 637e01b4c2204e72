"""Trigger search with 1 process against N processes under torchrun, on the same corpus slice.

Each configuration runs in fresh subprocesses and is repeated; the search covers ``--tokens``
tokens of the default corpus (sentences, k=50, signed, all layers) and is timed on rank 0 from
the first batch to the merged atlas (the merge included; model loading and corpus reading
excluded). Configurations:

- ``1 process x T threads``: one process, torch using the machine's cores (the baseline);
- ``N processes x T/N threads``: ``torchrun --nproc-per-node N`` (gloo), splitting the cores.

Usage:
    python benchmarks/scaling.py --model smollm2-135m --tokens 8192 --nproc 2 --out scaling.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
import ffkv_lens as fk
from ffkv_lens.corpus import Corpus
from ffkv_lens.distributed import init_from_env
here, device = init_from_env("cpu")
lens = fk.MemoryLens(fk.load_model({model!r}, device="cpu"))
corpus = Corpus.default()
corpus.describe()  # fingerprint read outside the timing
start = time.perf_counter()
atlas = lens.search_triggers(corpus, k=50, signed=True, max_tokens={tokens}, progress=False)
seconds = time.perf_counter() - start
if here.is_main:
    print(json.dumps({{"seconds": seconds, "tokens": atlas.manifest["progress"]["tokens"],
                      "threads": torch.get_num_threads(), "world": here.size}}))
"""


def run_once(model: str, tokens: int, nproc: int, threads: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(SCRIPT.format(root=str(ROOT), model=model, tokens=tokens))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    if nproc == 1:
        command = [sys.executable, handle.name]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            handle.name,
        ]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    finally:
        os.unlink(handle.name)
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="threads shared out (default: all)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    configs = {"1": (1, args.cores), str(args.nproc): (args.nproc, max(1, args.cores // args.nproc))}
    raw: dict[str, list[dict]] = {name: [] for name in configs}
    for rep in range(args.reps):  # interleaved, so that a noisy minute hurts both
        for name, (nproc, threads) in configs.items():
            result = run_once(args.model, args.tokens, nproc, threads)
            raw[name].append(result)
            print(f"rep {rep}: {nproc} process(es) x {threads} threads: {result['seconds']:.1f} s", file=sys.stderr)
    rate = {name: statistics.median(r["tokens"] / r["seconds"] for r in runs) for name, runs in raw.items()}
    out = {
        "benchmark": "scaling",
        "model": args.model,
        "tokens": raw["1"][0]["tokens"],
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "configs": {name: {"processes": p, "threads_each": t} for name, (p, t) in configs.items()},
        "tokens_per_s": rate,
        "speedup": rate[str(args.nproc)] / rate["1"],
        "raw": raw,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "raw"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
