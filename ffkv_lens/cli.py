"""The ``ffkv-lens`` command line.

Subcommands: ``models`` (the embedded models and their state), ``layout`` (load a model and
print its memory layout), ``run`` (the whole study into a run folder), ``report`` (rebuild a run
folder's ``report.html``), ``show`` (one memory in the terminal), ``browse`` (the memory
browser on a local web server; with ``--model`` also the Prompt page), ``compare`` (several runs
side by side, memories matched across models), ``trace`` (a prompt traced through the memories,
with and without edits), ``export`` (a run's memories for Neuronpedia, neuron-explainer or
Hugging Face datasets) and ``locate`` (the memories that carry each fact of a fact file, verified,
edited and audited). ``main(argv)`` is callable from tests.

Example:
    $ ffkv-lens layout --model smollm2-135m
"""

import argparse
import dataclasses
import inspect
import logging
import re
import sys
import time
import typing
from collections.abc import Sequence
from typing import Any, Literal

from ffkv_lens.errors import FfkvLensError
from ffkv_lens.storage.layout import RunPaths

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
    _add_browse(sub)
    _add_report(sub)
    _add_show(sub)
    _add_compare(sub)
    _add_trace(sub)
    _add_export(sub)
    _add_locate(sub)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port; pass 0 (any free port) to 65535")
    return int(text)


def _tokens(text: str) -> int | None:
    return None if text == "all" else _positive(text)


# RunConfig fields whose flag is not ``--field-name`` with the field's type: field -> (flag, argparse keywords).
_RUN_FLAG_OVERRIDES: dict[str, tuple[str, dict[str, Any]]] = {
    "signed": (
        "--unsigned",
        {"action": "store_false", "help": "keep only top-k (not bottom-k) triggers (default: both)"},
    ),
    "max_tokens": (
        "--max-tokens",
        {"type": _tokens, "help": "search budget in tokens, or 'all' (default %(default)s)"},
    ),
}


def _attribute_docs(cls: type) -> dict[str, str]:
    """``{name: text}`` of the ``Attributes:`` section of a Google-style class docstring (lines joined)."""
    doc = inspect.getdoc(cls) or ""
    section = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    found: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            name, found[match.group(1)] = match.group(1), match.group(2).strip()
        elif name is not None and line.startswith("        "):
            found[name] += " " + line.strip()
        elif line.strip():
            break
    return found


def config_arguments(parser: argparse.ArgumentParser, cls: type, positive: Sequence[str] = ()) -> None:
    """Add one flag per field of the dataclass ``cls`` (``RunConfig``): type, default, choices and help from it.

    ``--field-name`` per field (a bool field: a switch, ``--no-field-name`` when it defaults to True;
    :data:`_RUN_FLAG_OVERRIDES` names the exceptions); ``Literal`` fields take their choices, the
    integer fields named in ``positive`` only positive integers, optional fields their type; help is
    the field's entry in the class's ``Attributes:`` docstring, with the default shown.
    """
    hints, docs = typing.get_type_hints(cls), _attribute_docs(cls)
    for field in dataclasses.fields(cls):
        hint, name = hints[field.name], field.name.replace("_", "-")
        default_flag = f"--no-{name}" if hint is bool and field.default else f"--{name}"
        flag, extra = _RUN_FLAG_OVERRIDES.get(field.name, (default_flag, {}))
        options: dict[str, Any] = {"dest": field.name, "default": field.default}
        if hint is bool:  # a switch that turns the default around
            options["action"] = "store_false" if field.default else "store_true"
        elif typing.get_origin(hint) is Literal:
            options["choices"] = list(typing.get_args(hint))
        elif hint is int:
            options["type"] = _positive if field.name in positive else int
        else:
            options["type"] = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
        if "help" in extra:  # written for the flag, its default included
            options["help"] = extra["help"]
        else:
            options["help"] = docs.get(field.name, "").replace("``", "").replace("%", "%%") + " (default %(default)s)"
        parser.add_argument(flag, **{**options, **extra})


def _add_run(sub: argparse._SubParsersAction) -> None:
    from ffkv_lens.pipeline import POSITIVE_FIELDS, RunConfig

    run = sub.add_parser(
        "run",
        help="trigger search and every analysis of the paper into a run folder (resumable)",
        description="Run the whole study on a model and corpus into --out. Re-running resumes an interrupted "
        "run; a finished run is not overwritten without --force. Every flag but --out and --force is a setting "
        "of ffkv_lens.pipeline.RunConfig.",
    )
    config_arguments(run, RunConfig, positive=POSITIVE_FIELDS)
    run.add_argument("--out", required=True, help="the run folder")
    run.add_argument("--force", action="store_true", help="redo a finished run in --out")


def _cmd_run(args: argparse.Namespace) -> int:
    from ffkv_lens.pipeline import RunConfig, run_study

    config = RunConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(RunConfig)})
    start = time.perf_counter()
    folder = run_study(config, args.out, force=args.force, say=lambda line: print(line, flush=True))
    print(f"finished in {(time.perf_counter() - start) / 60:.1f} min: {folder}")
    for figure in sorted(RunPaths(folder).figures.glob("*.png")):
        print(f"  {figure}")
    print(f"report: {RunPaths(folder).report}")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser(
        "report",
        help="rebuild a run folder's report.html (self-contained: settings, figures, tables, memory gallery)",
        description="Write RUN_DIR/report.html from the run folder (no model needed). Figures missing from "
        "figures/ are redrawn from their tables first; steps that did not run are shown as 'not run'.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (--out of `ffkv-lens run`)")
    report.add_argument("--per-category", type=_positive, default=3, help="gallery memories per category and layer")
    report.add_argument("--examples", type=_positive, default=5, help="trigger examples per memory card")


def _cmd_report(args: argparse.Namespace) -> int:
    from ffkv_lens.report import RunFolder, write_report
    from ffkv_lens.report.figures import FIGURES, missing_figures, write_figures

    run = RunFolder(args.run_dir)
    if missing := missing_figures(run.path):
        for name in missing:
            run.table(FIGURES[name][1])  # a damaged table: one-line DamagedFileError before drawing
        drawn = write_figures(run.path, run.manifest.get("layout", {}).get("n_layers"))["figures"]
        print(f"redrew figures from their tables: {', '.join(drawn)}")
    print(write_report(run.path, per_category=args.per_category, examples=args.examples))
    return 0


def _add_show(sub: argparse._SubParsersAction) -> None:
    show = sub.add_parser(
        "show",
        help="one memory in the terminal: trigger examples (peak token marked), next tokens, value tokens",
        description="Print one memory (layer, key) of a run folder: its top trigger examples with the peak token "
        "marked (reverse video on a terminal, [[...]] otherwise), the coefficient and the next token, and the "
        "value's top and bottom tokens with their logits; then, when the search recorded them, the memory's "
        "statistics: "
        "the histogram as a sparkline with density, mean and std, and samples from each activation interval. "
        "No model needed.",
    )
    show.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (--out of `ffkv-lens run`)")
    show.add_argument("--layer", type=int, required=True, help="the layer (0-based)")
    show.add_argument("--key", type=int, required=True, help="the key (memory) within the layer, 0 to d_mlp - 1")
    show.add_argument("--sign", type=int, choices=[1, -1], default=1, help="1: top-k examples; -1: bottom-k")
    show.add_argument("--examples", type=_positive, default=10, help="trigger examples to print (default 10)")
    show.add_argument("--color", choices=["auto", "always", "never"], default="auto", help="mark the peak in color")
    show.add_argument(
        "--samples", type=_positive, default=3, help="quantile samples to print per activation interval (default 3)"
    )


def _cmd_show(args: argparse.Namespace) -> int:
    import os

    from ffkv_lens.report import RunFolder
    from ffkv_lens.report.memories import format_card
    from ffkv_lens.report.memory_stats import format_stats, memory_stats

    run = RunFolder(args.run_dir)
    card = run.card(args.layer, args.key, sign=args.sign, examples=args.examples)
    tty = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    color = args.color == "always" or (args.color == "auto" and tty)
    print(format_card(card, color=color))
    print(format_stats(memory_stats(run.atlas, args.layer, args.key), color=color, samples=args.samples))
    return 0


_RUN_MODEL = "<the run's model>"  # --model given without a value


def _add_browse(sub: argparse._SubParsersAction) -> None:
    browse = sub.add_parser(
        "browse",
        help="explore the memories of one or more runs (and their cross-model matches) in a local web page",
        description="Index each run folder (once; again when the run changes) into RUN_DIR/browser.sqlite, and each "
        "comparison folder's matches into CMP_DIR/browser.sqlite, then serve the memory browser on a loopback "
        "address until Ctrl-C. A comparison folder brings in all its runs; the first run is shown first.",
    )
    browse.add_argument(
        "paths", nargs="+", metavar="PATH", help="a run folder (--out of `ffkv-lens run`) or a comparison folder "
        "(--out of `ffkv-lens compare`)",
    )  # fmt: skip
    browse.add_argument("--port", type=_port, default=8000, help="TCP port (0: pick a free one; default 8000)")
    browse.add_argument("--host", default="127.0.0.1", help="loopback address to listen on (default 127.0.0.1)")
    browse.add_argument("--no-open", action="store_true", help="do not open the page in a web browser")
    browse.add_argument("--rebuild", action="store_true", help="rebuild the indexes even if they are current")
    browse.add_argument(
        "--model", nargs="?", const=_RUN_MODEL, default=None, metavar="NAME_OR_PATH",
        help="load a model once and add the Prompt page (trace a prompt, edit memories, generate); without a "
        "value: the first run's own model (its manifest's config.model)",
    )  # fmt: skip
    browse.add_argument("--device", default=None, help="device of --model: cpu, cuda... (default: cuda if available)")


def _browse_model(args: argparse.Namespace, catalog: Any) -> Any:
    """The Prompt page's model (``--model``), or None."""
    from ffkv_lens.browser.prompt import PromptModel
    from ffkv_lens.errors import ConfigError
    from ffkv_lens.storage import read_json

    if args.model is None:
        return None
    run = catalog.runs[catalog.default]
    name = args.model
    if name == _RUN_MODEL:
        name = read_json(RunPaths(run.folder).manifest).get("config", {}).get("model")
        if not isinstance(name, str):
            raise ConfigError(f"{run.folder}: its manifest names no config.model; pass --model NAME_OR_PATH.")
    print(f"loading model {name} for the Prompt page ...", flush=True)
    return PromptModel.load(name, device=args.device, run=run.label)


def _cmd_browse(args: argparse.Namespace) -> int:
    from ffkv_lens.browser import BrowserServer, open_catalog

    start = time.perf_counter()
    catalog = open_catalog(args.paths, rebuild=args.rebuild, progress=True)
    server = BrowserServer(catalog, host=args.host, port=args.port)
    server.prompt = _browse_model(args, catalog)  # after the port is taken: a busy port fails before the load
    for run in catalog.runs.values():
        print(f"run {run.label}: {run.index}")
    for comparison in catalog.comparisons:
        print(f"comparison {comparison.folder}: {comparison.index or 'no tables/matches.csv, no matches'}")
    print(f"indexes ready in {time.perf_counter() - start:.1f} s")
    print(f"memory browser: {server.url}  (Ctrl-C to stop)", flush=True)
    if not args.no_open:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    cmp = sub.add_parser(
        "compare",
        help="compare run folders of several models: overlaid curves, matched memories, report.html",
        description="Overlay the per-layer analyses of the runs by relative depth and match memories across the "
        "models (value distributions over the shared vocabulary, key coefficients over the same text), each "
        "calibrated against a permutation null at a false-discovery rate. Writes --out/report.html.",
    )
    cmp.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="two or more run folders")
    cmp.add_argument("--out", required=True, help="the comparison folder to write")
    cmp.add_argument("--allow-different-corpora", action="store_true", help="compare runs on different corpora")
    cmp.add_argument("--no-match", action="store_true", help="curves only (no model is loaded)")
    cmp.add_argument("--fdr", type=float, default=0.05, help="false-discovery rate of reported matches")
    cmp.add_argument("--positions", type=_positive, default=2000, help="aligned positions of the key sample")
    cmp.add_argument("--documents", type=_positive, default=400, help="documents drawn for the key sample")
    cmp.add_argument("--top-n", type=_positive, default=3, help="closest memories kept per memory")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def _cmd_compare(args: argparse.Namespace) -> int:
    from ffkv_lens.comparison import compare

    start = time.perf_counter()
    result = compare(
        args.run_dirs, args.out, match=not args.no_match, allow_different_corpora=args.allow_different_corpora,
        fdr=args.fdr, positions=args.positions, documents=args.documents, top_n=args.top_n, seed=args.seed,
        device=args.device, say=lambda line: print(line, flush=True),
    )  # fmt: skip
    print(f"finished in {(time.perf_counter() - start) / 60:.1f} min: {result.path}")
    print(f"report: {result.path / 'report.html'}")
    return 0


def _add_trace(sub: argparse._SubParsersAction) -> None:
    trace = sub.add_parser(
        "trace",
        help="trace a prompt through the memories, optionally under edits (zero, scale, set)",
        description="Print the model's prediction after TEXT and, per layer, the residual's top token before and "
        "after the FFN and the memories contributing most to the prediction. With --zero/--scale/--set the "
        "trace is printed without and with the edits; --generate N also generates N tokens both ways.",
    )
    trace.add_argument("text", metavar="TEXT", help="the prompt")
    trace.add_argument("--model", default="smollm2-135m", help="embedded name, local HF folder or hub name")
    trace.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    trace.add_argument("--position", type=int, default=-1, help="position to trace (default -1: the last)")
    trace.add_argument("--top", type=_positive, default=5, help="next tokens listed (default 5)")
    trace.add_argument("--memories", type=_positive, default=3, help="top memories listed per layer (default 3)")
    for op, form in (("zero", "L:K[,K...]"), ("scale", "L:K[,K...]=S"), ("set", "L:K[,K...]=V")):
        trace.add_argument(
            f"--{op}", action="append", default=[], metavar=form, help=f"{op} memories K of layer L (repeatable)"
        )
    trace.add_argument("--generate", type=int, default=0, metavar="N", help="also generate N tokens, both ways")


def _cmd_trace(args: argparse.Namespace) -> int:
    from ffkv_lens import MemoryLens, load_model
    from ffkv_lens.analysis.interventions import parse_edit, validate_edits
    from ffkv_lens.errors import ConfigError
    from ffkv_lens.report.traces import format_comparison, format_trace

    specs = [parse_edit(op, spec) for op in ("zero", "scale", "set") for spec in getattr(args, op)]
    if args.generate < 0:
        raise ConfigError(f"--generate {args.generate}; pass a number of tokens >= 0.")
    lens = MemoryLens(load_model(args.model, device=args.device))
    edits = validate_edits(lens.adapter, specs)
    options = dict(position=args.position, top=args.top, top_tokens=3)
    base = lens.trace(args.text, **options)
    if not edits:
        print(format_trace(base, memories=args.memories, next_tokens=args.top))
    else:
        edited = lens.trace(args.text, edits=edits, **options)
        print("== without edits ==")
        print(format_trace(base, memories=args.memories, next_tokens=args.top))
        print(f"== with edits: {'; '.join(edit.describe() for edit in edits)} ==")
        print(format_trace(edited, memories=args.memories, next_tokens=args.top))
        print("== change ==")
        print(format_comparison(base, edited))
    if args.generate:
        print(f"generation without edits: {lens.generate(args.text, max_new_tokens=args.generate)!r}")
        if edits:
            print(f"generation with edits:    {lens.generate(args.text, max_new_tokens=args.generate, edits=edits)!r}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    from ffkv_lens.export.folder import FORMATS

    export = sub.add_parser(
        "export",
        help="export a run's memories for other tools: Neuronpedia, OpenAI NeuronRecord, Hugging Face datasets",
        description="Write the run's memories in one format into --out (docs/exports.md). The per-token coefficients "
        "of the exported examples are recomputed with the run's model (its manifest's config.model) and checked "
        "against the atlas. A non-empty --out that is not an export is refused; a finished export is replaced only "
        "with --force, and only the files an export writes are removed.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (--out of `ffkv-lens run`)")
    export.add_argument("--format", required=True, choices=list(FORMATS), help="the format to write")
    export.add_argument("--out", required=True, help="the export folder")
    export.add_argument("--layers", type=int, nargs="+", default=None, help="layers to export (default: all)")
    export.add_argument("--model-id", default=None, help="neuronpedia: the modelId (default: from the run's model)")
    export.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    export.add_argument("--force", action="store_true", help="replace a finished export in --out")


def _cmd_export(args: argparse.Namespace) -> int:
    from ffkv_lens.export import export_run

    start = time.perf_counter()
    options = {"model_id": args.model_id} if args.format == "neuronpedia" and args.model_id else {}
    result = export_run(
        args.run_dir, args.out, format=args.format, layers=args.layers, device=args.device, force=args.force,
        options=options,
    )  # fmt: skip
    done = result.manifest["result"]
    print(f"exported {args.format} in {time.perf_counter() - start:.1f} s: {result.path}")
    print("  " + ", ".join(f"{k} {v}" for k, v in done.items() if isinstance(v, (int, str))))
    return 0


def _add_locate(sub: argparse._SubParsersAction) -> None:
    from ffkv_lens.facts.folder import LocateSettings

    d = LocateSettings()
    loc = sub.add_parser(
        "locate",
        help="locate the memories that carry each fact of a fact file, verify by ablation, edit and audit",
        description="For each fact of --facts (JSONL; docs/causal.md): rank the memories by attribution to log "
        "p(target), zero the top ones (measured), suppress or enhance them and measure efficacy, specificity, the "
        "KL divergence on corpus positions and (with --atlas) the collateral audit. Writes --out/report.html.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    loc.add_argument("--model", default="smollm2-135m", help="embedded name, local HF folder or hub name")
    loc.add_argument("--facts", required=True, help="the fact file (JSONL: prompts, target, paraphrases, ...)")
    loc.add_argument("--out", required=True, help="the facts folder to write (new or empty)")
    loc.add_argument("--method", default=d.method, choices=["attribution", "integrated_gradients"],
                     help="coefficient x gradient, or integrated gradients (Dai et al.)")  # fmt: skip
    loc.add_argument("--top", type=_positive, default=d.top, help="memories located and verified per fact")
    loc.add_argument("--steps", type=_positive, default=d.steps, help="integration steps (integrated_gradients)")
    loc.add_argument("--edit-memories", type=_positive, default=d.edit_memories, help="top memories edited")
    loc.add_argument("--operation", default=d.operation, choices=["suppress", "enhance"],
                     help="scale the edited memories down (suppress) or up (enhance)")  # fmt: skip
    loc.add_argument("--strength", type=float, default=None, help="factor of the edit (default: 0 / 2)")
    loc.add_argument("--unrelated", type=int, default=d.unrelated, help="other facts measured for specificity")
    loc.add_argument("--atlas", default=None, metavar="RUN_DIR", help="run folder (or atlas folder) to audit with")
    loc.add_argument("--corpus", default="default", help="corpus of the KL positions (see `run --corpus`)")
    loc.add_argument("--kl-positions", type=int, default=d.kl_positions, help="corpus positions of the KL (0: none)")
    loc.add_argument("--audit-examples", type=_positive, default=d.audit_examples, help="per edited memory")
    loc.add_argument("--seed", type=int, default=d.seed, help="seed of the KL positions")
    loc.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    loc.add_argument("--force", action="store_true", help="replace the outputs of an earlier locate in --out")


def _atlas_path(path: str) -> Any:
    """The atlas folder of ``--atlas``: a run folder's ``atlas/`` or an atlas folder itself."""
    from pathlib import Path

    from ffkv_lens.errors import ConfigError

    for candidate in (RunPaths(Path(path)).atlas, Path(path)):
        if (candidate / "atlas.safetensors").is_file():
            return candidate
    raise ConfigError(f"--atlas {path!r} holds no trigger atlas; pass a finished run folder or its atlas/ folder.")


def _cmd_locate(args: argparse.Namespace) -> int:
    from ffkv_lens import Corpus, MemoryLens, TriggerAtlas, load_model
    from ffkv_lens.analysis.causal import read_facts
    from ffkv_lens.errors import ConfigError
    from ffkv_lens.facts import LocateSettings, write_facts_folder
    from ffkv_lens.storage.layout import FACTS, claim_folder

    if args.unrelated < 0 or args.kl_positions < 0:
        raise ConfigError(f"--unrelated {args.unrelated} / --kl-positions {args.kl_positions}; pass numbers >= 0.")
    facts = read_facts(args.facts)
    claim_folder(args.out, FACTS, force=args.force)  # refuse a foreign --out before loading anything
    settings = LocateSettings(
        method=args.method, top=args.top, steps=args.steps, edit_memories=args.edit_memories,
        operation=args.operation, strength=args.strength, unrelated=args.unrelated, kl_positions=args.kl_positions,
        audit_examples=args.audit_examples, seed=args.seed,
    )  # fmt: skip
    start = time.perf_counter()
    lens = MemoryLens(load_model(args.model, device=args.device))
    atlas = None if args.atlas is None else TriggerAtlas.load(_atlas_path(args.atlas), tokenizer=lens.adapter.tokenizer)
    corpus = Corpus.from_spec(args.corpus) if args.kl_positions else None
    source = {"facts_file": str(args.facts), "model_name": args.model, "atlas": args.atlas, "corpus_spec": args.corpus}
    out = write_facts_folder(
        lens, facts, args.out, settings=settings, atlas=atlas, corpus=corpus, source=source, force=args.force,
        say=lambda line: print(line, flush=True),
    )  # fmt: skip
    print(f"{len(facts)} facts in {(time.perf_counter() - start) / 60:.1f} min: {out}")
    print(f"report: {out / 'report.html'}")
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


REPORT_BUG = "ffkv-lens: this is a bug in ffkv-lens; please report it with the traceback above and the command you ran."


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    0: success. 2: a usage or input error (a bad argument, a missing or damaged file), printed as one line.
    130: interrupted (Ctrl-C). 1: a bug in ffkv-lens: the traceback, then a line asking to report it.
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return _dispatch(args)
    except FfkvLensError as err:
        print(f"ffkv-lens: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ffkv-lens: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a file the user named cannot be read or written (permissions, a folder in the way)
        where = f" {err.filename}" if err.filename else ""
        print(f"ffkv-lens: error: cannot access{where}: {err.strerror or err}; check the path and its permissions.",
              file=sys.stderr)  # fmt: skip
        return 2
    except Exception:  # noqa: BLE001 - anything else is a bug: show it, ask for a report
        import traceback

        traceback.print_exc(file=sys.stderr)
        print(REPORT_BUG, file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "models":
        return _cmd_models()
    if args.command == "run":
        return _cmd_run(args)
    if args.command == "browse":
        return _cmd_browse(args)
    if args.command == "report":
        return _cmd_report(args)
    if args.command == "show":
        return _cmd_show(args)
    if args.command == "compare":
        return _cmd_compare(args)
    if args.command == "trace":
        return _cmd_trace(args)
    if args.command == "export":
        return _cmd_export(args)
    if args.command == "locate":
        return _cmd_locate(args)
    return _cmd_layout(args.model, args.device, args.dtype)


if __name__ == "__main__":
    sys.exit(main())
