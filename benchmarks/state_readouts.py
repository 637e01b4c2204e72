"""Section-5 state readouts on a real model: the tiled pass against the reference, in the same run.

Records r, y, o at ``--positions`` sampled prefixes of the default corpus (every layer), then
reads them in the vocabulary with :func:`ffkv_lens.kernels.readouts.state_tops`
(the reference: ``lens.readout`` of each state) and :func:`ffkv_lens.kernels.readouts_tiled.state_tops`
(two products per row instead of three; see the module), alternately, after a warm-up.
Reports the minimum and median wall time of each, the rows whose ``o`` the tiled pass read
directly, and how many tokens differ between the two; every differing token is re-scored in
float64 (logits of the two tokens and their gap), to tell float32 near-ties from a bug.

Usage:
    HF_HUB_OFFLINE=1 python benchmarks/state_readouts.py --model smollm2-135m --out readouts.json
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import ffkv_lens as fk  # noqa: E402
from ffkv_lens.analysis import sampling  # noqa: E402
from ffkv_lens.kernels import readouts, readouts_tiled  # noqa: E402

TOPS = ("top_r", "top_y", "top_o")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--positions", type=int, default=300, help="sampled prefixes (rows = positions x layers)")
    parser.add_argument("--max-units", type=int, default=20_000, help="corpus units read to draw them")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args(argv)


def record(lens: fk.MemoryLens, positions: int, max_units: int) -> tuple[torch.Tensor, ...]:
    config = sampling.SampleConfig(positions=positions, max_units=max_units)
    prefixes = sampling.sample_prefixes(fk.Corpus.default(), lens.adapter.tokenizer, config).prefixes
    pad = lens.adapter.tokenizer.pad_token_id or 0
    layers = list(range(lens.n_layers))
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for batch in sampling.prefix_batches(prefixes, batch_tokens=4096, bos_token_id=lens.adapter.bos_token_id,
                                         pad_token_id=pad):  # fmt: skip
        states = sampling.record_states(lens, batch, layers)
        for part, x in zip(parts, (states.resid_before, states.ffn_output, states.resid_after), strict=False):
            part.append(x.flatten(0, 1))
        parts[3].append(states.final_token[:, None].expand(-1, len(layers)).reshape(-1))
    return tuple(torch.cat(p) for p in parts)


def float64_gaps(lens: fk.MemoryLens, states: torch.Tensor, got: torch.Tensor, want: torch.Tensor) -> list[dict]:
    """For each differing row: both tokens' logits in float64 (norm in float32, as the model does)."""
    parts = lens.adapter.readout_parts()
    w_u = parts.unembedding.double()
    rows = []
    for i in (got != want).nonzero().squeeze(1)[:20].tolist():
        logits = parts.norm(states[i : i + 1]).double() @ w_u
        if parts.bias is not None:
            logits += parts.bias.double()
        a, b = int(got[i]), int(want[i])
        rows.append({"row": i, "tiled": a, "reference": b, "float64_argmax": int(logits.argmax()),
                     "gap_tiled_minus_reference": float(logits[0, a] - logits[0, b]),
                     "max_abs_logit": float(logits.abs().max())})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lens = fk.MemoryLens(fk.load_model(args.model))
    with torch.no_grad():
        r, y, o, final = record(lens, args.positions, args.max_units)
        small = slice(0, min(256, r.shape[0]))
        runs = {"reference": readouts.state_tops, "tiled": readouts_tiled.state_tops}
        for fn in runs.values():  # warm-up
            fn(lens, r[small], y[small], o[small], final[small])
        times: dict[str, list[float]] = {name: [] for name in runs}
        out = {}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                start = time.perf_counter()
                out[name] = fn(lens, r, y, o, final)
                times[name].append(time.perf_counter() - start)
        parts = lens.adapter.readout_parts()
        beta = parts.norm(torch.zeros(1, lens.d_model))[0]
        gain, centres = lens.adapter.final_norm_gain(), lens.adapter.final_norm_centres
        *_, direct = readouts_tiled._o_weights(parts, gain, centres, beta, r, y, o)
        ref, tiled = out["reference"], out["tiled"]
        result = {
            "model": args.model,
            "rows": int(r.shape[0]),
            "d_vocab": lens.d_vocab,
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch": torch.__version__,
            "seconds": {name: {"min": min(t), "median": statistics.median(t)} for name, t in times.items()},
            "speedup_min": min(times["reference"]) / min(times["tiled"]),
            "o_read_directly": int(direct.numel()),
            "prob_r_max_abs_diff": float((tiled.prob_r - ref.prob_r).abs().max()),
            "differing": {name: int((getattr(tiled, name) != getattr(ref, name)).sum()) for name in TOPS},
            "differing_float64": {
                name: float64_gaps(lens, states, getattr(tiled, name), getattr(ref, name))
                for name, states in (("top_r", r), ("top_y", y), ("top_o", o))
            },
        }  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("rows", "seconds", "speedup_min", "o_read_directly", "differing")}))
    return result


if __name__ == "__main__":
    main()
