"""``--format neuronpedia``: the Neuronpedia bulk-data layout (gzipped JSONL batches per source).

Layout, as ``utils/neuronpedia-utils/neuronpedia_utils/export-data.py`` (hijohnnylin/neuronpedia)
writes it::

    v1/<modelId>/<layer>-ffkv-mlp/model.jsonl, source.jsonl, sourceset.jsonl
    v1/<modelId>/<layer>-ffkv-mlp/features/batch-N.jsonl.gz      features N*1024 .. N*1024+1023, by index
    v1/<modelId>/<layer>-ffkv-mlp/activations/batch-N.jsonl.gz   the activations of those same features

Feature rows carry the columns of the ``Neuron`` table that we can fill, activation rows those of the
``Activation`` table (``apps/webapp/prisma/schema.prisma``); docs/exports.md lists each field, how it
is computed, and every field left out (the importer's defaults apply).
"""

import gzip
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ffkv_lens.errors import ConfigError
from ffkv_lens.export.source import ExportSource, LayerExamples
from ffkv_lens.storage import atomic_folder

__all__ = ["BATCH", "LOGIT_BINS", "ROOT", "SET_NAME", "model_id_of", "source_id", "write_neuronpedia"]

ROOT = "v1"
BATCH = 1024  # features per batch file (export-data.py's FEATURES_EXPLANATIONS_BATCH_SIZE / ACTIVATIONS_BATCH_SIZE)
SET_NAME = "ffkv-mlp"  # the source set: one source per layer, "<layer>-ffkv-mlp"
LOGIT_BINS = 40  # bars of each value's logit histogram over the vocabulary
GZIP_LEVEL = 1  # fast: the batches are JSON text, level 1 keeps most of the ratio at a fraction of the time
_LOGIT_CHUNK = 256  # memories projected at a time for the logit histograms
_MODEL_ID = re.compile(r"^[a-z0-9_-]{1,128}$")  # Neuronpedia's Model.id rule (letters, digits, - and _; lowercase)


def source_id(layer: int) -> str:
    """The Neuronpedia source of a layer's memories: ``"<layer>-ffkv-mlp"``."""
    return f"{layer}-{SET_NAME}"


def model_id_of(model_name: str) -> str:
    """A Neuronpedia model id from the run's model (the last path part, lowercased, other characters as ``-``)."""
    base = Path(model_name.rstrip("/")).name or model_name
    return re.sub(r"[^a-z0-9_-]+", "-", base.lower()).strip("-")[:128] or "model"


def _check_model_id(model_id: str) -> str:
    if not _MODEL_ID.match(model_id):
        raise ConfigError(
            f"--model-id {model_id!r} is not a Neuronpedia model id; use 1 to 128 lowercase letters, digits, - or _."
        )
    return model_id


def _histograms(values: torch.Tensor, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: ``bins`` equal-width bars from the row's min to max: (counts, bar centres)."""
    lo, hi = values.min(dim=1, keepdim=True).values, values.max(dim=1, keepdim=True).values
    width = (hi - lo).clamp_min(1e-12) / bins
    index = ((values - lo) / width).floor().clamp(0, bins - 1).long()
    counts = torch.zeros(values.shape[0], bins, dtype=torch.int64, device=values.device)
    counts.scatter_add_(1, index, torch.ones_like(index))
    centres = lo + width * (torch.arange(bins, device=values.device) + 0.5)
    return counts.cpu().numpy(), centres.double().cpu().numpy()


def logit_histograms(source: ExportSource, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """``[d_mlp, LOGIT_BINS]`` counts and bar centres of each value's logits over the whole vocabulary."""
    counts, centres = [], []
    with torch.no_grad():
        for start in range(0, source.d_mlp, _LOGIT_CHUNK):
            memories = list(range(start, min(start + _LOGIT_CHUNK, source.d_mlp)))
            got = _histograms(source.lens.value_logits(layer, memories).float(), LOGIT_BINS)
            counts.append(got[0])
            centres.append(got[1])
    return np.concatenate(counts), np.concatenate(centres)


_POW10 = np.array([float(10**i) for i in range(23)])  # exact powers of ten as doubles


def round7(values: Any) -> np.ndarray:
    """Each value as ``float(f"{v:.7g}")`` (7 significant digits), vectorised where that is exact.

    For ``2**-18 <= |v| < 1e6`` the decimal rounding is ``round(v * 10**k) / 10**k`` with an exact power of
    ten: the product's rounding error (at most 2**-30) is smaller than the distance of a float32 value's
    scaled fraction from one half, so the same digits are chosen, and the division is correctly rounded
    like ``float()`` of the digits. Zeros are kept; other values (tiny, huge, not finite) go through the
    string formatting itself.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    out = x.copy()
    mag = np.abs(x)
    fast = (mag >= 2.0**-18) & (mag < 1e6)
    k = (6 - np.floor(np.log10(mag[fast]))).astype(np.int64)
    scaled = mag[fast] * _POW10[k]
    k = k - (scaled >= 1e7) + (scaled < 1e6)  # log10 one off next to a power of ten
    out[fast] = np.round(x[fast] * _POW10[k]) / _POW10[k]
    slow = np.flatnonzero(~fast & (mag != 0))
    out[slow] = [float(f"{float(v):.7g}") for v in x[slow]]
    return out


def _round(values: Any) -> list[float]:
    """Floats at float32 precision (7 significant digits): what the values hold, in fewer characters."""
    return round7(values).tolist()


def _round_rows(matrix: Any) -> list[list[float]]:
    """:func:`_round` of every row of a 2-d array."""
    matrix = np.asarray(matrix, dtype=np.float64)
    return round7(matrix).reshape(matrix.shape).tolist()


def feature_rows(source: ExportSource, layer: int, model_id: str) -> list[dict[str, Any]]:
    """One feature row per memory of ``layer``, by index."""
    stats = source.atlas.stats(layer)
    edges = source.atlas.histogram_edges(layer).double().numpy()
    centres = _round((edges[:-1] + edges[1:]) / 2)
    freq = source.atlas.histograms(layer).numpy()
    logit_counts, logit_centres = logit_histograms(source, layer)
    hook = f"blocks.{layer}.mlp.hook_post"  # TransformerLens's name of the coefficients (an alias on the bridge)
    p = source.projection
    logit_bars = _round_rows(logit_centres)  # each [d_mlp, n] matrix rounded at once, not key by key
    top, bottom = _round_rows(p.top_logits[layer].numpy()), _round_rows(p.bottom_logits[layer].numpy())
    freq_rows, count_rows = freq.tolist(), logit_counts.tolist()
    rows = []
    for key, stat in zip(range(source.d_mlp), stats.itertuples(index=False), strict=True):
        value = source.value_tokens(layer, key)
        rows.append(
            {
                "modelId": model_id, "layer": source_id(layer), "index": str(key),
                "maxActApprox": float(stat.max) if np.isfinite(stat.max) else 0.0,
                "frac_nonzero": float(stat.density) if np.isfinite(stat.density) else 0.0,
                "freq_hist_data_bar_heights": freq_rows[key], "freq_hist_data_bar_values": centres,
                "logits_hist_data_bar_heights": count_rows[key],
                "logits_hist_data_bar_values": logit_bars[key],
                "pos_str": value["top_tokens"], "pos_values": top[key],
                "neg_str": value["bottom_tokens"], "neg_values": bottom[key],
                "hookName": hook, "sourceSetName": SET_NAME,
            }
        )  # fmt: skip
    return rows


def activation_rows(source: ExportSource, examples: LayerExamples, model_id: str) -> list[dict[str, Any]]:
    """One activation row per exported example (top bin first, then the quantile groups), by feature index."""
    frame = examples.frame
    top_max = frame[frame["kind"] == "top"].groupby("key")["coefficient"].max().to_dict()
    lengths = [len(c) for c in examples.coefficients]
    rounded = round7(np.concatenate(examples.coefficients)) if lengths else np.empty(0)
    ends = np.cumsum(lengths).tolist()
    rows = []
    for i, row in enumerate(frame.itertuples(index=False)):
        if not lengths[i]:  # a peak on the BOS of an empty unit: nothing to show
            continue
        values = rounded[ends[i] - lengths[i] : ends[i]]
        top = row.kind == "top"
        binned = (-1.0, float(top_max[row.key]), -1.0) if top else (row.group_lo, row.group_hi, row.group_share)
        name = "top" if top else f"quantile{row.group}"
        rows.append(
            {
                "id": f"{model_id}@{source_id(examples.layer)}@{row.key}@{name}-{row.rank}",
                "modelId": model_id, "layer": source_id(examples.layer), "index": str(row.key),
                "tokens": source.unit(int(row.unit_id))[1], "values": values.tolist(),
                "maxValue": float(values.max()), "minValue": float(values.min()),
                "maxValueTokenIndex": int(values.argmax()), "qualifyingTokenIndex": int(row.position),
                "binMin": float(binned[0]), "binMax": float(binned[1]), "binContains": float(binned[2]),
            }
        )  # fmt: skip
    return rows


def _write_batches(folder: Path, rows: list[dict[str, Any]]) -> int:
    """``batch-N.jsonl.gz`` files of the rows of features ``N*BATCH`` to ``N*BATCH + BATCH - 1``."""
    folder.mkdir(parents=True)
    batches: dict[int, list[str]] = {}
    for row in rows:
        batches.setdefault(int(row["index"]) // BATCH, []).append(json.dumps(row, allow_nan=False))
    for n, lines in sorted(batches.items()):
        (folder / f"batch-{n}.jsonl.gz").write_bytes(
            gzip.compress(("\n".join(lines) + "\n").encode(), GZIP_LEVEL, mtime=0)
        )
    return len(batches)


def _descriptions(source: ExportSource, layer: int, model_id: str) -> dict[str, dict[str, Any]]:
    """``model.jsonl``, ``source.jsonl`` and ``sourceset.jsonl`` rows (the fields we know)."""
    n_layers = int(source.run.manifest["layout"]["n_layers"])
    corpus = source.run.manifest.get("corpus") or {}
    return {
        "model": {"id": model_id, "displayName": source.model_name, "layers": n_layers,
                  "neuronsPerLayer": source.d_mlp, "owner": "", "tlensId": None},
        "source": {"id": source_id(layer), "modelId": model_id, "setName": SET_NAME, "hasDashboards": True,
                   "dataset": corpus.get("name"), "num_prompts": len(source.atlas.units)},
        "sourceset": {"modelId": model_id, "name": SET_NAME, "type": "mlp-neurons", "creatorName": "ffkv-lens",
                      "description": "FFN key-value memories (Geva et al. 2021): coefficients at mlp.hook_post",
                      "urls": []},
    }  # fmt: skip


def write_neuronpedia(
    source: ExportSource, out: Path, *, progress: bool = False, model_id: str | None = None
) -> dict[str, Any]:
    """Write ``out/v1/<modelId>/<layer>-ffkv-mlp/...`` for every exported layer."""
    model_id = _check_model_id(model_id or model_id_of(source.model_name))
    counts = {"features": 0, "activations": 0}
    with atomic_folder(out / ROOT) as root:
        for examples in source.examples(kinds=("top", "quantile"), progress=progress):
            folder = root / model_id / source_id(examples.layer)
            features = feature_rows(source, examples.layer, model_id)
            activations = activation_rows(source, examples, model_id)
            _write_batches(folder / "features", features)
            _write_batches(folder / "activations", activations)
            for name, row in _descriptions(source, examples.layer, model_id).items():
                (folder / f"{name}.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
            counts["features"] += len(features)
            counts["activations"] += len(activations)
    return {"model_id": model_id, "sources": [source_id(layer) for layer in source.layers], **counts}
