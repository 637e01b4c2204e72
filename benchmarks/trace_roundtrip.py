"""Python-level time of one "edit + re-run" of a prompt (``lens.trace(tokens, edits=...)`` + ``to_dict()``).

This is the work behind one browser round trip (without HTTP). Baseline in the same run: the bare
forward pass of the model on the same tokens. After a warm-up (which fills the per-adapter weight
cache), each of ``--repeats`` rounds traces with a different single-memory ablation, as a user
clicking memories would. Reports median, min and max seconds of both.

Usage:
    python benchmarks/trace_roundtrip.py --model smollm2-135m --out trace_roundtrip.json [--threads 1]
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

import ffkv_lens as fk  # noqa: E402

TEXT = "The capital of France is a city called Paris and"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lens = fk.MemoryLens(fk.load_model(args.model, device="cpu"))
    tokens = lens.adapter.to_tokens(args.text)
    base = lens.trace(tokens)
    targets = base.memories.head(args.repeats + 1)[["layer", "key"]].itertuples(index=False)
    edits = [[fk.Edit.zero(int(layer), int(key))] for layer, key in targets]
    with torch.no_grad():
        lens.adapter.model(tokens)
    trace_s, forward_s = [], []
    for edit in edits[1:]:
        start = time.perf_counter()
        lens.trace(tokens, edits=edit).to_dict()
        trace_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            lens.adapter.model(tokens)
        forward_s.append(time.perf_counter() - start)
    stats = lambda xs: {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}  # noqa: E731
    result = {
        "model": args.model,
        "prompt_tokens": int(tokens.shape[1]),
        "repeats": len(trace_s),
        "threads": torch.get_num_threads(),
        "edit_and_rerun_s": stats(trace_s),
        "bare_forward_s": stats(forward_s),
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "torch": torch.__version__,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
