"""The whole study on one model and corpus, into a resumable run folder.

Steps, each written atomically and skipped when a re-run finds it done:

1. ``triggers``: trigger search (checkpointed in ``search/``) -> ``atlas/``
2. ``values``: value projection, with the agreement's target ranks -> ``values/``
3. ``dynamics``: composition and residual vs FFN (section 5), one pass -> ``tables/composition_*``, ``residual_*``
4. ``agreement``: value/trigger agreement (paper section 4) -> ``tables/agreement_*``
5. ``causal``: causal agreement, memories ablated on their triggers (docs/causal.md) -> ``tables/causal_*``
6. ``mutation``: shallow vs semantic keys (section 3.2) -> ``tables/mutation_*``
7. ``figures``: PNG + SVG per analysis (``ffkv_lens.report.figures.write_figures``) -> ``figures/``
8. ``report``: one self-contained HTML page (settings, figures, tables, memory gallery) -> ``report.html``

The names, their order and the folder's entries are defined once, in ``ffkv_lens.storage.layout``
(``RUN_STEPS``, ``RunPaths``); ``STEPS`` here is ``RUN_STEPS``.

Under ``torchrun`` (``ffkv_lens.distributed``) steps 1 and 3 are shared by every rank (batches
split round-robin, results merged exactly); rank 0 writes the folder and runs the other steps alone,
the other ranks write only their checkpoints (``search/rank{r}-of-{n}/``).

``manifest.json`` records the settings, the model and corpus, library versions, each step's
time and the run's status. A finished run is never overwritten without ``force``; a folder made
with other settings or another model is refused with the differences named.

Example:
    >>> from ffkv_lens.pipeline import RunConfig, run_study  # doctest: +SKIP
    >>> run_study(RunConfig(model="smollm2-135m", max_tokens=50_000), "runs/smollm2")  # doctest: +SKIP
"""

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ffkv_lens.analysis.search_config import BATCH_TOKENS, CHECKPOINT_EVERY, SEARCH_DEFAULTS
from ffkv_lens.analysis.stats.settings import STATS_DEFAULTS
from ffkv_lens.corpus import UNIT_KINDS, UnitKind
from ffkv_lens.errors import ConfigError, FfkvLensError, RunFolderError
from ffkv_lens.storage import atomic_write_json, read_json
from ffkv_lens.storage.layout import RUN, RUN_STEPS, FolderClaim, RunPaths, claim_folder, remove_outputs
from ffkv_lens.storage.tables import library_versions, write_table

__all__ = ["STEPS", "RunConfig", "run_study"]

log = logging.getLogger(__name__)
STEPS = RUN_STEPS  # the steps in the order they run (ffkv_lens.storage.layout owns them)
# RunConfig's integer settings that must be positive (the CLI's flags for them take positive integers only).
POSITIVE_FIELDS = (
    "k",
    "max_len",
    "top_k",
    "keys_per_layer",
    "examples",
    "causal_keys_per_layer",
    "causal_examples",
    "positions",
    "batch_tokens",
    "checkpoint_every",
    "histogram_bins",
    "quantile_groups",
    "quantile_samples",
)


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a study run (all recorded in the manifest).

    Attributes:
        model: Embedded name, local HF folder or hub name.
        corpus: ``"default"``, a path (text file, folder of .txt, .jsonl) or ``"hf:NAME"``.
        encoding_errors: Bytes of corpus files that are not UTF-8: ``"strict"`` refuses them
            (the error names the file and byte offset), ``"replace"`` reads them as U+FFFD.
        unit: Trigger-search unit: ``"sentence"`` (the paper's), ``"document"`` or ``"window"``.
        k: Trigger examples per key.
        max_len: Longest unit in tokens.
        max_tokens: Token budget of the trigger search (None: whole corpus).
        signed: Also keep bottom-k triggers (and run the signed agreement variant).
        top_k: Tokens kept per value in the projection.
        keys_per_layer: Keys per layer in the mutation test (the paper: 100 x 50 examples; times in
            docs/performance.md).
        examples: Trigger examples per key in the mutation test.
        causal_keys_per_layer: Memories sampled per layer in the causal agreement (each ablated on its
            top trigger examples, beside a matched control; docs/causal.md).
        causal_examples: Top trigger examples per memory in the causal agreement.
        positions: Sampled positions for composition and residual dynamics.
        seed: Seed of every sampled quantity.
        device: ``"cpu"``, ``"cuda"``... (None: cuda if available).
        dtype: Model dtype name.
        batch_tokens: Padded tokens per forward pass of the trigger search (speed and memory only: the
            atlas is the same at any value). The dynamics and mutation steps keep their own batch
            size: their tables agree across batch sizes only to float rounding, so a run fixes it.
        checkpoint_every: Tokens between checkpoints of the trigger search (resume granularity only).
        stats: Gather per-memory statistics (histogram, density, quantile samples) in the trigger search's pass.
        density_threshold: A position is active for a memory when its coefficient's magnitude exceeds this.
        histogram_bins: Histogram bins per layer (the same edges for every memory of a layer).
        quantile_groups: Activation intervals per memory with sampled examples.
        quantile_samples: Examples sampled per activation interval.
        quadrants: Count the gate/up sign combinations of active positions (gated MLPs only).
    """

    model: str = "smollm2-135m"
    corpus: str = "default"
    encoding_errors: Literal["strict", "replace"] = "strict"
    unit: UnitKind = SEARCH_DEFAULTS.unit
    k: int = SEARCH_DEFAULTS.k
    max_len: int = SEARCH_DEFAULTS.max_len
    max_tokens: int | None = 50_000
    signed: bool = True
    top_k: int = 10
    keys_per_layer: int = 20
    examples: int = 10
    causal_keys_per_layer: int = 8
    causal_examples: int = 2
    positions: int = 1000
    seed: int = 0
    device: str | None = None
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    batch_tokens: int = BATCH_TOKENS
    checkpoint_every: int = CHECKPOINT_EVERY
    stats: bool = STATS_DEFAULTS.stats
    density_threshold: float = STATS_DEFAULTS.density_threshold
    histogram_bins: int = STATS_DEFAULTS.histogram_bins
    quantile_groups: int = STATS_DEFAULTS.quantile_groups
    quantile_samples: int = STATS_DEFAULTS.quantile_samples
    quadrants: bool = STATS_DEFAULTS.quadrants

    def __post_init__(self) -> None:
        from ffkv_lens.corpus.sources import check_encoding_errors

        if self.unit not in UNIT_KINDS:
            raise ConfigError(f"unit={self.unit!r}; allowed: {UNIT_KINDS}.")
        check_encoding_errors(self.encoding_errors)
        for name in POSITIVE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}; pass a positive integer.")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ConfigError(f"max_tokens={self.max_tokens!r}; pass a positive integer or None (whole corpus).")
        from ffkv_lens.analysis.stats.settings import StatsSettings

        StatsSettings(self.stats, self.density_threshold, self.histogram_bins, self.quantile_groups,
                      self.quantile_samples, self.quadrants)  # validates the statistics' settings  # fmt: skip

    def results_identity(self) -> dict[str, Any]:
        """The settings that change results (device, batch size and checkpoint interval do not)."""
        return {k: v for k, v in asdict(self).items() if k not in ("device", "batch_tokens", "checkpoint_every")}


class _Run:
    """A run folder: its manifest and the bookkeeping of steps."""

    def __init__(self, folder: Path, config: RunConfig, manifest: dict[str, Any], writer: bool = True) -> None:
        self.folder, self.config, self.manifest, self.writer = folder, config, manifest, writer

    @classmethod
    def claim(cls, folder: Path, config: RunConfig, force: bool) -> FolderClaim:
        """Decide, writing nothing, whether ``folder`` may hold this run (refusals come before any loading)."""
        from ffkv_lens.report.memories import check_run_manifest

        claim = claim_folder(folder, RUN, force=force)
        if claim.manifest is not None:
            check_run_manifest(claim.manifest, RunPaths(folder).manifest)
        if claim.state == "resume":
            if claim.manifest.get("status") == "finished" and "report" in claim.manifest.get("steps", {}):
                raise RunFolderError(f"{folder} holds a finished run; pass --force (force=True) to redo it.")
            _check_same(claim.manifest.get("identity", {}), config.results_identity(), folder)
        return claim

    @classmethod
    def open(cls, claim: FolderClaim, config: RunConfig, corpus: Any, lens: Any) -> "_Run":
        """Rank 0, once the corpus and model are known to be good: create, replace or resume the folder."""
        folder = claim.folder
        # Hashing every weight takes about a second: once, for both the resume check and the manifest.
        model = {**lens.adapter.describe(), "weights_fingerprint": lens.adapter.weights_fingerprint()}
        if claim.state == "resume":
            _check_inputs(claim.manifest, corpus, model, folder)
            run = cls(folder, config, claim.manifest)
        else:
            if claim.state == "force":
                kept = remove_outputs(folder, RUN)
                if kept:
                    log.info("--force kept %d files that ffkv-lens did not write in %s", len(kept), folder)
            folder.mkdir(parents=True, exist_ok=True)
            run = cls(folder, config, _fresh_manifest(config))
        run.manifest["model"] = model
        run.manifest["layout"] = {"n_layers": lens.n_layers, "d_mlp": lens.d_mlp, "d_vocab": lens.d_vocab}
        run.manifest["corpus"] = corpus.describe()
        run.save()
        return run

    @classmethod
    def follow(cls, folder: Path, config: RunConfig) -> "_Run":
        """Another rank of a distributed run: read what rank 0 prepared, write nothing."""
        return cls(folder, config, read_json(RunPaths(folder).manifest), writer=False)

    def save(self) -> None:
        if self.writer:
            atomic_write_json(RunPaths(self.folder).manifest, self.manifest)

    def done(self, step: str) -> bool:
        return step in self.manifest["steps"]

    def step(self, name: str, fn: Callable[[], dict[str, Any] | None], say: Callable[[str], None]) -> None:
        if self.done(name):
            say(f"{name}: already done, skipped")
            return
        start = time.perf_counter()
        extra = fn() or {}
        seconds = round(time.perf_counter() - start, 2)
        self.manifest["steps"][name] = {"seconds": seconds, **extra}
        self.save()
        say(f"{name}: done in {seconds:.0f} s")


def _fresh_manifest(config: RunConfig) -> dict[str, Any]:
    return {
        "format": RUN.format,
        "status": "running",
        "config": asdict(config),
        "identity": config.results_identity(),
        "steps": {},
        "versions": library_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _check_same(old: dict[str, Any], new: dict[str, Any], folder: Path) -> None:
    old = {**RunConfig().results_identity(), **old}  # a setting added since the folder was made has its default
    diffs = [f"{key}: folder {old.get(key)!r} vs now {new[key]!r}" for key in sorted(new) if old.get(key) != new[key]]
    if diffs:
        raise RunFolderError(
            f"{folder} holds an unfinished run with other settings ({'; '.join(diffs)}). Resume it with the "
            "same settings, choose another --out, or pass --force to start over."
        )


def _check_inputs(manifest: dict[str, Any], corpus: Any, model: dict[str, Any], folder: Path) -> None:
    """A resumed run must read the same text with the same weights as the run it continues."""
    old_corpus, now = (manifest.get("corpus") or {}).get("fingerprint"), corpus.fingerprint()
    if old_corpus is not None and old_corpus != now:
        raise RunFolderError(
            f"{folder} was started on a corpus with fingerprint {old_corpus}, but the corpus now has "
            f"{now} (its files changed). Restore the text, choose another --out, or pass --force."
        )
    old = manifest.get("model") or {}
    if old.get("hf_architecture") not in (None, model.get("hf_architecture")):
        raise RunFolderError(
            f"{folder} was made with {old.get('model_name')!r}; this model is {model['model_name']!r}. "
            "Choose another --out, or pass --force to start over."
        )
    old_weights = old.get("weights_fingerprint")
    if old_weights is not None and old_weights != model["weights_fingerprint"]:
        raise RunFolderError(
            f"{folder} was started with weights of fingerprint {old_weights}, but {model['model_name']!r} now "
            "has other weights (the model or its package changed). Choose another --out, or pass --force."
        )


def _write_result(run: _Run, name: str, result: Any, tables: dict[str, str]) -> dict[str, Any]:
    for attr, stem in tables.items():
        write_table(getattr(result, attr), RunPaths(run.folder).table(stem, suffix=""))
    atomic_write_json(RunPaths(run.folder).settings(name), _jsonable(result.settings))
    return {"tables": sorted(tables.values())}


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=str))


def run_study(
    config: RunConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    say: Callable[[str], None] = log.info,
) -> Path:
    """Run every analysis of the paper into ``out``; resumes an interrupted run.

    Args:
        config: The settings.
        out: The run folder.
        force: Redo a finished run (its folder is replaced).
        progress: Show progress bars.
        say: Receives one-line messages for the user (the estimate, each step).

    Returns:
        The run folder.
    """
    import torch

    from ffkv_lens import MemoryLens, load_model
    from ffkv_lens.corpus import Corpus
    from ffkv_lens.distributed import init_from_env

    here, device = init_from_env(config.device)
    if not here.is_main:
        say = _silent
    folder = Path(out)
    # Nothing is written before the folder, the corpus and the model have all been checked.
    claim = _on_main_first(here, lambda: _Run.claim(folder, config, force), lambda: None)
    corpus = Corpus.from_spec(config.corpus, encoding_errors=config.encoding_errors)
    corpus.check_not_empty()
    lens = MemoryLens(load_model(config.model, device=device, dtype=getattr(torch, config.dtype)))
    run = _on_main_first(here, lambda: _Run.open(claim, config, corpus, lens), lambda: _Run.follow(folder, config))
    run.manifest["distributed"] = here.describe()
    with torch.no_grad():
        if not run.done("triggers"):
            from ffkv_lens.estimates import describe_estimates

            for line in describe_estimates(lens, corpus, config):
                say(line)
        _run_steps(run, lens, corpus, progress and here.is_main, say, here)
    return run.folder


def _silent(_: str) -> None:
    """``say`` of the ranks other than 0."""


def _on_main_first(here: Any, main: Callable[[], Any], others: Callable[[], Any]) -> Any:
    """Run ``main`` on rank 0, then ``others`` on the other ranks; an error on rank 0 stops every rank."""
    import torch

    from ffkv_lens.distributed import all_sum_

    result, error = None, None
    if here.is_main:
        try:
            result = main()
        except FfkvLensError as err:
            error = err
    failed = all_sum_(torch.tensor([int(error is not None)]), here)
    if error is not None:
        raise error
    if int(failed):
        raise RunFolderError("rank 0 refused the run folder (its message says why); stopping this rank too.")
    return result if here.is_main else others()


def _run_steps(run: _Run, lens: Any, corpus: Any, progress: bool, say: Callable[[str], None], here: Any) -> None:
    from ffkv_lens.analysis.agreement import agreement_targets, value_agreement
    from ffkv_lens.analysis.atlas import TriggerAtlas
    from ffkv_lens.analysis.dynamics import layer_dynamics
    from ffkv_lens.analysis.mutation import mutation_test
    from ffkv_lens.analysis.values import ValueProjection, project_values
    from ffkv_lens.distributed import main_section, wait_for_main
    from ffkv_lens.report import write_report
    from ffkv_lens.report.figures import write_figures

    c, folder, paths = run.config, run.folder, RunPaths(run.folder)

    def triggers() -> dict[str, Any]:
        atlas = lens.search_triggers(
            corpus, k=c.k, unit=c.unit, max_len=c.max_len, signed=c.signed, max_tokens=c.max_tokens,
            batch_tokens=c.batch_tokens, checkpoint_dir=str(paths.search), checkpoint_every=c.checkpoint_every,
            progress=progress, stats=c.stats, density_threshold=c.density_threshold, histogram_bins=c.histogram_bins,
            quantile_groups=c.quantile_groups, quantile_samples=c.quantile_samples, quadrants=c.quadrants,
        )  # fmt: skip
        if here.is_main:
            atlas.save(paths.atlas)
        return {"tokens": atlas.manifest["progress"]["tokens"], "units": atlas.manifest["progress"]["units"]}

    def values() -> dict[str, Any]:
        # Rank the agreement's target tokens in the same pass: no second projection for agreement.
        atlas = TriggerAtlas.load(paths.atlas)
        signs = (1, -1) if atlas.signed else (1,)
        targets = {sign: agreement_targets(atlas, sign) for sign in signs}
        projection = project_values(lens, top_k=c.top_k, layers=atlas.layers, rank_targets=targets)
        return {"path": str(projection.save(paths.values))}

    def dynamics() -> dict[str, Any]:
        # Rank 0 reuses the values' top and bottom tokens; other ranks (torchrun) derive the same tokens.
        result = layer_dynamics(
            lens,
            corpus,
            positions=c.positions,
            seed=c.seed,
            progress=progress,
            projection=projection,
        )
        tables = {"composition": "composition_per_layer", "residual": "residual_per_layer"}
        return _write_result(run, "dynamics", result, tables) if here.is_main else {}

    run.step("triggers", triggers, say)
    if here.is_main and paths.search.exists():  # the atlas is saved and recorded: the checkpoint is spent
        shutil.rmtree(paths.search)
    projection = None
    if here.is_main:  # the values are rank 0's alone; the other ranks go on to the shared dynamics
        with main_section(here):  # a failure here stops the other ranks too (they wait in a collective)
            run.step("values", values, say)
            projection = ValueProjection.load(paths.values, lens=lens)
    run.step("dynamics", dynamics, say)
    if not here.is_main:  # the other steps are rank 0's alone; its outcome is this rank's too
        wait_for_main(here)
        return

    def agreement() -> dict[str, Any]:
        result = value_agreement(lens, atlas, projection, seed=c.seed)
        out = _write_result(
            run, "agreement", result, {"per_layer": "agreement_per_layer", "per_memory": "agreement_per_memory"}
        )
        if c.signed:
            signed = value_agreement(lens, atlas, projection, variant="signed", seed=c.seed)
            _write_result(run, "agreement_signed", signed, {"per_layer": "agreement_signed_per_layer"})
        return out

    def causal() -> dict[str, Any]:
        from ffkv_lens.analysis.causal import causal_agreement
        from ffkv_lens.storage.reading import read_table

        correlational = read_table(paths.table("agreement_per_memory"), lineterminator="\n")
        result = causal_agreement(
            lens,
            atlas,
            keys_per_layer=c.causal_keys_per_layer,
            examples=c.causal_examples,
            seed=c.seed,
            agreement=correlational,
            progress=progress,
        )
        return _write_result(
            run, "causal", result, {"per_layer": "causal_per_layer", "per_memory": "causal_per_memory"}
        )

    def mutation() -> dict[str, Any]:
        result = mutation_test(
            lens,
            atlas,
            keys_per_layer=c.keys_per_layer,
            examples=c.examples,
            seed=c.seed,
            progress=progress,
        )
        return _write_result(
            run, "mutation", result, {"per_layer": "mutation_per_layer", "per_key": "mutation_per_key"}
        )

    with main_section(here, last=True):
        atlas = TriggerAtlas.load(paths.atlas)
        run.step("agreement", agreement, say)
        run.step("causal", causal, say)
        run.step("mutation", mutation, say)
        run.step("figures", lambda: write_figures(folder, lens.n_layers), say)
        run.step("report", lambda: _finish(run, write_report), say)


def _finish(run: _Run, write_report: Callable[[Path], Path]) -> dict[str, Any]:
    """The last step: the run is recorded as finished first, so that its report says so."""
    run.manifest.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    run.save()
    try:
        return {"path": str(write_report(run.folder))}
    except BaseException:
        run.manifest["status"] = "running"
        run.manifest.pop("finished")
        run.save()
        raise
