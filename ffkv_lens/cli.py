"""The ``ffkv-lens`` command line.

Subcommands: ``models`` (the embedded models and their state), ``layout`` (load a model and
print its memory layout) and ``run`` (the whole study into a run folder). ``main(argv)`` is
callable from tests.

Example:
    $ ffkv-lens layout --model smollm2-135m
"""

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from ffkv_lens.errors import FfkvLensError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ffkv-lens",
        description="Read transformer feed-forward layers as key-value memories (Geva et al. 2021).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("models", help="list the embedded models and whether each is installed/converted")
    layout = sub.add_parser("layout", help="load a model and print its FFN memory layout")
    layout.add_argument("--model", default="smollm2-135m", help="embedded name, local HF folder or hub name")
    layout.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    layout.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    _add_run(sub)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _tokens(text: str) -> int | None:
    return None if text == "all" else _positive(text)


def _add_run(sub: argparse._SubParsersAction) -> None:
    from ffkv_lens.pipeline import RunConfig

    d = RunConfig()
    run = sub.add_parser(
        "run",
        help="trigger search and every analysis of the paper into a run folder (resumable)",
        description="Run the whole study on a model and corpus into --out. Re-running resumes an interrupted "
        "run; a finished run is not overwritten without --force.",
    )
    run.add_argument("--model", default=d.model, help=f"embedded name, HF folder or hub name (default {d.model})")
    run.add_argument("--corpus", default=d.corpus, help="default | PATH (.txt, folder, .jsonl) | hf:NAME")
    run.add_argument("--unit", default=d.unit, choices=["sentence", "document", "window"])
    run.add_argument("--k", type=_positive, default=d.k, help="trigger examples per key")
    run.add_argument("--max-len", type=_positive, default=d.max_len, help="longest unit in tokens")
    run.add_argument("--max-tokens", type=_tokens, default=d.max_tokens, help="search budget in tokens, or 'all'")
    run.add_argument("--unsigned", action="store_true", help="keep only top-k (not bottom-k) triggers")
    run.add_argument("--top-k", type=_positive, default=d.top_k, help="tokens kept per value")
    run.add_argument("--keys-per-layer", type=_positive, default=d.keys_per_layer, help="mutation test keys")
    run.add_argument("--examples", type=_positive, default=d.examples, help="mutation test examples per key")
    run.add_argument("--positions", type=_positive, default=d.positions, help="positions for section-5 dynamics")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    run.add_argument("--dtype", default=d.dtype, choices=["float32", "float64", "bfloat16", "float16"])
    run.add_argument("--batch-tokens", type=_positive, default=d.batch_tokens, help="padded tokens per forward")
    run.add_argument("--out", required=True, help="the run folder")
    run.add_argument("--force", action="store_true", help="redo a finished run in --out")


def _cmd_run(args: argparse.Namespace) -> int:
    from ffkv_lens.pipeline import RunConfig, run_study

    config = RunConfig(
        model=args.model, corpus=args.corpus, unit=args.unit, k=args.k, max_len=args.max_len,
        max_tokens=args.max_tokens, signed=not args.unsigned, top_k=args.top_k,
        keys_per_layer=args.keys_per_layer, examples=args.examples, positions=args.positions, seed=args.seed,
        device=args.device, dtype=args.dtype, batch_tokens=args.batch_tokens,
    )  # fmt: skip
    start = time.perf_counter()
    folder = run_study(config, args.out, force=args.force, say=lambda line: print(line, flush=True))
    print(f"finished in {(time.perf_counter() - start) / 60:.1f} min: {folder}")
    for figure in sorted((folder / "figures").glob("*.png")):
        print(f"  {figure}")
    return 0


def _cmd_models() -> int:
    from ffkv_lens.models import list_models, model_status

    print(f"{'name':<14} {'installed':<10} {'converted':<10} install with")
    for name in list_models():
        status = model_status(name)
        print(f"{name:<14} {str(status.installed):<10} {str(status.converted):<10} {status.pip_command}")
    return 0


def _cmd_layout(model_name: str, device: str | None, dtype_name: str) -> int:
    import torch

    from ffkv_lens import MemoryLens, load_model

    start = time.perf_counter()
    lens = MemoryLens(load_model(model_name, device=device, dtype=getattr(torch, dtype_name)))
    print(f"{model_name}: loaded in {time.perf_counter() - start:.1f} s")
    print(lens)
    print(f"memories: {lens.n_layers} layers x {lens.d_mlp} = {lens.n_layers * lens.d_mlp}")
    print(f"value readout: {lens.value_readout_mode}")
    hooks = lens.hook_names(0)
    for field, name in vars(hooks).items():
        print(f"  layer-0 {field:<17} {name}")
    print(f"{'layer':>5} {'|key| mean':>11} {'|up key| mean':>14} {'|value| mean':>13}")
    for layer in range(lens.n_layers):
        up = lens.up_keys(layer)
        up_norm = f"{up.norm(dim=-1).mean():14.3f}" if up is not None else f"{'-':>14}"
        key_norm, value_norm = lens.keys(layer).norm(dim=-1).mean(), lens.values(layer).norm(dim=-1).mean()
        print(f"{layer:>5} {key_norm:11.3f} {up_norm} {value_norm:13.3f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 2 usage or input error)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "models":
            return _cmd_models()
        if args.command == "run":
            return _cmd_run(args)
        return _cmd_layout(args.model, args.device, args.dtype)
    except FfkvLensError as err:
        print(f"ffkv-lens: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
