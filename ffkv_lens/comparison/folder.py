"""``compare``: several run folders into one comparison folder.

Layout of the folder (``--out`` of ``ffkv-lens compare``)::

    manifest.json            format ``COMPARISON.format`` (ffkv_lens.storage.layout), runs (label, path,
                             model, layout, corpus), settings, per pair: vocabulary alignment, match
                             settings and counts, timings
    tables/curves.csv        tidy per-layer metrics of every run (ffkv_lens.comparison.curves)
    tables/matches.csv       closest memories across runs, both directions, both kinds (see MATCH_COLUMNS)
    tables/calibration.csv   real vs null best scores above thresholds (the FDR estimate at each)
    figures/curve_*.svg|png  overlaid curves by relative depth
    figures/density_*.svg|png, calibration_*.svg|png   per pair and kind
    report.html              the comparison as one self-contained page

Matching needs the models (loaded by the name each run recorded) and the runs' corpus; the
curves need only the run folders (``match=False``).

Example:
    >>> comparison = compare(["runs/smollm2", "runs/gemma3"], out="runs/cmp")  # doctest: +SKIP
    >>> comparison.matches.query("significant").head()  # doctest: +SKIP
"""

import logging
import time
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ffkv_lens.comparison.curves import CURVES, plot_overlay, tidy_curves
from ffkv_lens.comparison.matching import MatchResult, flat_to_memory
from ffkv_lens.comparison.reader import COMPARE_FORMAT, MATCH_COLUMNS, Comparison
from ffkv_lens.errors import ConfigError, RunFolderError
from ffkv_lens.report.memories import RunFolder
from ffkv_lens.storage import atomic_write_json
from ffkv_lens.storage.layout import COMPARISON, ComparisonPaths, claim_folder
from ffkv_lens.storage.tables import library_versions, write_table

__all__ = ["COMPARE_FORMAT", "MATCH_COLUMNS", "Comparison", "compare"]

log = logging.getLogger(__name__)

THRESHOLDS = np.round(np.arange(0.1, 1.0001, 0.05), 2)


def _labels(runs: list[RunFolder]) -> list[str]:
    labels: list[str] = []
    for run in runs:
        base = Path(str(run.manifest["config"]["model"])).name or run.path.name
        label, n = base, 2
        while label in labels:
            label, n = f"{base}-{n}", n + 1
        labels.append(label)
    return labels


def _check_corpora(runs: dict[str, RunFolder], allow: bool) -> bool:
    prints = {label: (run.manifest.get("corpus") or {}).get("fingerprint") for label, run in runs.items()}
    differ = len(set(prints.values())) > 1
    if differ and not allow:
        raise ConfigError(
            f"the runs read different corpora (fingerprints {prints}); curves and key matches are only comparable "
            "on the same text. Re-run on one corpus, or pass --allow-different-corpora (every figure then says so)."
        )
    return differ


def compare(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    match: bool = True,
    allow_different_corpora: bool = False,
    fdr: float = 0.05,
    positions: int = 2000,
    documents: int = 400,
    top_n: int = 3,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    say: Callable[[str], None] = log.info,
) -> Comparison:
    """Compare run folders: overlaid curves, and (``match``) memories matched across models.

    Args:
        run_dirs: Two or more run folders (``--out`` of ``ffkv-lens run``).
        out: The comparison folder to write (replaced files are written atomically).
        match: Load the models and match memories (values and keys); False: curves only.
        allow_different_corpora: Compare runs on different corpora (figures say so).
        fdr: False-discovery rate of the reported matches.
        positions: Aligned positions of the shared key sample.
        documents: Documents drawn for the key sample.
        top_n: Closest memories kept per memory and direction.
        seed: Seed of the key sample and of the nulls.
        device: Where the models run (default: cuda if available).
        progress: Show progress bars.
        say: Receives one line per step.

    Returns:
        The comparison, as written.

    Raises:
        ConfigError: Fewer than two runs, a bad setting, or different corpora not allowed.
        RunFolderError: A folder is not a run folder.
    """
    if len(run_dirs) < 2:
        raise ConfigError(f"compare needs at least two run folders; got {len(run_dirs)}: {list(map(str, run_dirs))}.")
    if not 0 < fdr < 1:
        raise ConfigError(f"fdr={fdr!r}; pass a rate in (0, 1), e.g. 0.05.")
    if top_n < 1:
        raise ConfigError(f"top_n={top_n!r}; pass a positive integer.")
    out = Path(out)
    claim_folder(out, COMPARISON)  # a non-empty folder of anything else (a run folder, say) is refused
    folders = [RunFolder(path) for path in run_dirs]
    for run in folders:
        if "layout" not in run.manifest:
            raise RunFolderError(f"run folder {str(run.path)!r} has no model layout yet: let `ffkv-lens run` finish.")
    runs = dict(zip(_labels(folders), folders, strict=True))
    differ = _check_corpora(runs, allow_different_corpora)
    paths = ComparisonPaths(out)
    paths.tables.mkdir(parents=True, exist_ok=True)
    note = "runs on different corpora" if differ else None
    started = time.perf_counter()
    curves = tidy_curves(runs)
    write_table(curves, paths.table("curves", suffix=""))
    for curve in CURVES:
        fig = plot_overlay(curves, curve, note=note, out=paths.figure(f"curve_{curve.name}"))
        if fig is not None:
            _close(fig)
    say(f"curves: {curves['metric'].nunique() if len(curves) else 0} metrics of {len(runs)} runs")
    manifest: dict[str, Any] = {
        "format": COMPARE_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": [_describe_run(label, run) for label, run in runs.items()],
        "corpora_differ": differ,
        "allow_different_corpora": allow_different_corpora,
        "settings": {
            "match": match,
            "fdr": fdr,
            "positions": positions,
            "documents": documents,
            "top_n": top_n,
            "seed": seed,
            "relative_depth": "(layer + 1) / n_layers",
        },  # fmt: skip
        "pairs": [],
        "timings": {"curves_s": round(time.perf_counter() - started, 2)},
        "versions": library_versions(),
    }
    if match:
        rows, calibration = _match_all(runs, manifest, out, device, progress, say)
        write_table(pd.DataFrame(rows, columns=MATCH_COLUMNS), paths.table("matches", suffix=""))
        write_table(pd.DataFrame(calibration), paths.table("calibration", suffix=""))
    atomic_write_json(paths.manifest, manifest)
    from ffkv_lens.comparison.html import write_comparison_report

    write_comparison_report(out)
    return Comparison.load(out)


def _describe_run(label: str, run: RunFolder) -> dict[str, Any]:
    layout = run.manifest["layout"]
    return {
        "label": label,
        "path": str(run.path.resolve()),
        "model": run.manifest["config"]["model"],
        "n_layers": int(layout["n_layers"]),
        "d_mlp": int(layout["d_mlp"]),
        "corpus": run.manifest["config"].get("corpus"),
        "corpus_fingerprint": (run.manifest.get("corpus") or {}).get("fingerprint"),
    }


def _close(fig: Any) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def _load_lens(run: RunFolder, device: str | None) -> Any:
    import torch

    from ffkv_lens import MemoryLens, load_model

    config = run.manifest["config"]
    lens = MemoryLens(load_model(config["model"], device=device, dtype=getattr(torch, config.get("dtype", "float32"))))
    layout = run.manifest["layout"]
    if (lens.n_layers, lens.d_mlp) != (int(layout["n_layers"]), int(layout["d_mlp"])):
        raise RunFolderError(
            f"model {config['model']!r} now loads with {lens.n_layers} layers x {lens.d_mlp} memories, but run "
            f"{str(run.path)!r} recorded {layout['n_layers']} x {layout['d_mlp']}: the model changed since the run."
        )
    return lens


def _match_all(runs: dict[str, RunFolder], manifest: dict[str, Any], out: Path, device: str | None, progress: bool,
               say: Callable[[str], None]) -> tuple[list[tuple[Any, ...]], list[dict[str, Any]]]:  # fmt: skip
    import torch

    from ffkv_lens.comparison.matching import key_sample, match_keys, match_values
    from ffkv_lens.comparison.token_alignment import align_vocabularies
    from ffkv_lens.corpus import Corpus

    settings = manifest["settings"]
    lenses = {}
    for label, run in runs.items():
        say(f"loading {label} ({run.manifest['config']['model']})")
        lenses[label] = _load_lens(run, device)
    rows: list[tuple[Any, ...]] = []
    calibration: list[dict[str, Any]] = []
    first = next(iter(runs.values()))
    corpus = Corpus.from_spec(str(first.manifest["config"].get("corpus", "default")))
    with torch.no_grad():
        for label_a, label_b in combinations(runs, 2):
            lens_a, lens_b = lenses[label_a], lenses[label_b]
            pair: dict[str, Any] = {"run_a": label_a, "run_b": label_b}
            t0 = time.perf_counter()
            alignment = align_vocabularies(lens_a.adapter.tokenizer, lens_b.adapter.tokenizer)
            pair["vocabulary"] = alignment.describe()
            say(f"{label_a} vs {label_b}: {alignment.n_shared:,} shared tokens ({alignment.share_a:.0%} of "
                f"{label_a}'s vocabulary, {alignment.share_b:.0%} of {label_b}'s); matching values")  # fmt: skip
            values = match_values(lens_a, lens_b, alignment, top_n=settings["top_n"], seed=settings["seed"])
            t1 = time.perf_counter()
            say(f"{label_a} vs {label_b}: key sample of {settings['positions']} aligned positions")
            sample = key_sample(lens_a, lens_b, corpus, positions=settings["positions"],
                                documents=settings["documents"], seed=settings["seed"], progress=progress)  # fmt: skip
            keys = match_keys(sample, top_n=settings["top_n"], seed=settings["seed"])
            t2 = time.perf_counter()
            pair["timings"] = {"values_s": round(t1 - t0, 2), "keys_s": round(t2 - t1, 2)}
            d_a, d_b = lens_a.d_mlp, lens_b.d_mlp
            pair["kinds"] = {}
            for result in (values, keys):
                other = keys if result is values else values
                summary = {"settings": result.settings}
                for direction, (src, dst, d_src, d_dst) in {
                    "ab": ((label_a, label_b, d_a, d_b)), "ba": ((label_b, label_a, d_b, d_a))
                }.items():  # fmt: skip
                    rows.extend(_rows(result, other, direction, src, dst, d_src, d_dst, settings["fdr"]))
                    side = getattr(result, direction)
                    calibration.extend(_calibration(result.kind, src, dst, side))
                    summary[direction] = {
                        "memories": int(side.valid.sum()),
                        "significant": int(side.significant(settings["fdr"]).sum()),
                        "median_best": float(np.median(side.scores[side.valid, 0])) if side.valid.any() else None,
                        "median_null": float(np.median(side.null)) if side.null.size else None,
                    }
                    _density_figure(out, result.kind, src, dst, side, d_src, d_dst, settings["fdr"],
                                    runs[src].manifest["layout"], runs[dst].manifest["layout"])  # fmt: skip
                pair["kinds"][result.kind] = summary
                say(f"{label_a} vs {label_b} ({result.kind}): {summary['ab']['significant']:,} of "
                    f"{summary['ab']['memories']:,} memories of {label_a} and {summary['ba']['significant']:,} of "
                    f"{summary['ba']['memories']:,} of {label_b} matched at FDR {settings['fdr']}")  # fmt: skip
                _calibration_figure(out, result.kind, label_a, label_b, calibration)
            manifest["pairs"].append(pair)
    return rows, calibration


def _rows(result: MatchResult, other: MatchResult, direction: str, src: str, dst: str, d_src: int, d_dst: int,
          fdr: float) -> list[tuple[Any, ...]]:  # fmt: skip
    side = getattr(result, direction)
    n_src, top_n = side.scores.shape
    sources = np.repeat(np.arange(n_src), top_n)
    targets = side.index.reshape(-1)
    ranks = np.tile(np.arange(1, top_n + 1), n_src)
    keep = side.valid[sources]
    sources, targets, ranks = sources[keep], targets[keep], ranks[keep]
    scores = side.scores.reshape(-1)[keep]
    q = np.where(ranks == 1, side.q_values[sources], np.nan)
    significant = (ranks == 1) & (q <= fdr)
    index_a, index_b = (sources, targets) if direction == "ab" else (targets, sources)
    if result.kind == "value":
        value_sim, key_corr = scores, other.pair_scores(index_a, index_b)
    else:
        value_sim, key_corr = other.pair_scores(index_a, index_b), scores
    layer_s, key_s = flat_to_memory(sources, d_src)
    layer_t, key_t = flat_to_memory(targets, d_dst)
    return list(zip([result.kind] * len(sources), [src] * len(sources), layer_s.tolist(), key_s.tolist(),
                    [dst] * len(sources), layer_t.tolist(), key_t.tolist(), ranks.tolist(),
                    np.round(scores, 6).tolist(), q.tolist(), significant.tolist(),
                    np.round(value_sim, 6).tolist(), np.round(key_corr, 6).tolist(), strict=True))  # fmt: skip


def _calibration(kind: str, src: str, dst: str, side: Any) -> list[dict[str, Any]]:
    best = side.scores[side.valid, 0]
    scale = best.size / max(side.null.size, 1)
    return [
        {"kind": kind, "run_a": src, "run_b": dst, "threshold": float(t), "real": int((best >= t).sum()),
         "null": float((side.null >= t).sum() * scale),
         "fdr_estimate": float(min(1.0, ((side.null >= t).sum() * scale + 1) / max(int((best >= t).sum()), 1)))}
        for t in THRESHOLDS
    ]  # fmt: skip


def _density_figure(out: Path, kind: str, src: str, dst: str, side: Any, d_src: int, d_dst: int, fdr: float,
                    layout_src: dict[str, Any], layout_dst: dict[str, Any]) -> None:  # fmt: skip
    """Heatmaps: share of each source layer's memories whose best match lies in each target layer."""
    import matplotlib

    from ffkv_lens.report.figures import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_src, n_dst = int(layout_src["n_layers"]), int(layout_dst["n_layers"])
    layers_src = np.arange(side.scores.shape[0]) // d_src
    layers_dst = side.index[:, 0] // d_dst
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    for ax, (title, mask) in zip(axes, (
        (f"significant best matches (FDR {fdr})", side.significant(fdr)),
        ("all best matches (no threshold)", side.valid),
    ), strict=True):  # fmt: skip
        grid = np.zeros((n_src, n_dst))
        np.add.at(grid, (layers_src[mask], layers_dst[mask]), 1.0)
        grid /= d_src
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(f"{title}\n{int(mask.sum()):,} memories", fontsize=9)
        ax.set_xlabel(f"layer of {dst}")
        ax.set_ylabel(f"layer of {src}")
        fig.colorbar(image, ax=ax, fraction=0.046, label="share of the layer's memories")
    fig.suptitle(f"Where the memories of {src} find their match in {dst} ({kind})", fontsize=10)
    save_figure(fig, ComparisonPaths(out).figure(f"density_{kind}_{src}__{dst}"))
    plt.close(fig)


def _calibration_figure(out: Path, kind: str, label_a: str, label_b: str, rows: list[dict[str, Any]]) -> None:
    """Real vs null best scores above each threshold, both directions."""
    import matplotlib.pyplot as plt

    from ffkv_lens.report.figures import _figure, save_figure

    fig, ax = _figure(f"{kind} matches: real best scores vs the permutation null")
    for color, (src, dst) in zip(("#1f5fa8", "#d1495b"), ((label_a, label_b), (label_b, label_a)), strict=True):
        part = [r for r in rows if r["kind"] == kind and r["run_a"] == src and r["run_b"] == dst]
        ts = [r["threshold"] for r in part]
        ax.plot(ts, [max(r["real"], 0.5) for r in part], color=color, marker="o", ms=3, label=f"{src} → {dst}: real")
        ax.plot(ts, [max(r["null"], 0.5) for r in part], color=color, ls="--", label=f"{src} → {dst}: null")
    ax.set_yscale("log")
    ax.set_xlabel("best score at least")
    ax.set_ylabel("memories")
    ax.legend(fontsize=7)
    save_figure(fig, ComparisonPaths(out).figure(f"calibration_{kind}_{label_a}__{label_b}"))
    plt.close(fig)
