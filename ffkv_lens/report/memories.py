"""A run folder read back without the model: tables, figures and single memories ("cards").

:class:`RunFolder` opens the folder written by ``ffkv-lens run`` (``ffkv_lens.pipeline``) and
reads whatever its finished steps left: tables, figures, the trigger atlas (which carries its
tokenizer, so examples decode offline) and the value projection. :meth:`RunFolder.card` gathers
everything about one memory; :meth:`RunFolder.gallery` picks the most interesting memories of a
layer by the agreement and mutation tables; :func:`format_card` renders a card for a terminal.

Example:
    >>> run = RunFolder("runs/smollm2")  # doctest: +SKIP
    >>> print(format_card(run.card(29, 1234, examples=5), color=False))  # doctest: +SKIP
"""

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ffkv_lens.errors import ConfigError, DamagedFileError, RunFolderError
from ffkv_lens.storage import read_json
from ffkv_lens.storage.layout import ANALYSIS_STEPS, MANIFEST, RUN, RunPaths
from ffkv_lens.storage.reading import check_columns, field, read_table

__all__ = [
    "ANALYSIS_STEPS",
    "CATEGORIES",
    "ExampleView",
    "GalleryPick",
    "MemoryCard",
    "RunFolder",
    "check_run_manifest",
    "format_card",
    "printable",
]

# Gallery categories: name -> (title, the step whose table ranks them).
CATEGORIES = {
    "agreement": ("Highest agreement", "agreement"),
    "precision": ("Highest precision@k", "agreement"),
    "shallow": ("Most shallow (mutation test)", "mutation"),
    "semantic": ("Most semantic (mutation test)", "mutation"),
    "causal": ("Most causal memories", "causal"),
}
RUN_FIX = "the run folder is damaged: restore it, or re-run `ffkv-lens run` into a new --out"
# Columns readers of a table rely on: (integer-valued, numeric, any); per-layer tables: "layer" and their CIs.
_TABLE_COLUMNS = {
    "agreement_per_memory": (("layer", "key"), ("top1_next_token_id", "rank", "precision_at_k", "n_examples"),
                             ("agrees",)),
    "mutation_per_key": (("layer", "key"), ("change_first", "change_last", "change_random", "shallow_score"),
                         ("kind",)),
    "causal_per_memory": (("layer", "key", "n_examples"), ("causal_score", "total_next", "control_total_next"), ()),
}  # fmt: skip


@dataclass(frozen=True)
class ExampleView:
    """One trigger example split around its peak token (``before + peak`` is the prefix)."""

    rank: int
    position: int
    coefficient: float
    before: str
    peak: str
    next_token: str | None
    unit_id: int
    doc_id: int


@dataclass(frozen=True)
class MemoryCard:
    """Everything a run folder knows about one memory (layer, key).

    Attributes:
        layer: The layer.
        key: The key (memory) index.
        sign: 1: top-k trigger examples; -1: bottom-k (most negative) examples.
        examples: The first ``examples`` trigger examples, best first.
        kept: Trigger examples the atlas keeps for this key and sign.
        top_tokens: ``(token, logit)`` of the value's highest logits; None when ``values`` did not run.
        bottom_tokens: ``(token, logit)`` of its lowest logits; None likewise.
        max_prob: Max softmax probability of the value's distribution; None likewise.
        agreement: This memory's row of ``agreement_per_memory`` (sign 1 only), or None.
        mutation: Its row of ``mutation_per_key`` when the key was tested (sign 1 only), or None.
        causal: Its row of ``causal_per_memory`` when the causal step sampled it (sign 1 only), or None.
    """

    layer: int
    key: int
    sign: int
    examples: tuple[ExampleView, ...]
    kept: int
    top_tokens: tuple[tuple[str, float], ...] | None
    bottom_tokens: tuple[tuple[str, float], ...] | None
    max_prob: float | None
    agreement: dict[str, Any] | None
    mutation: dict[str, Any] | None
    causal: dict[str, Any] | None = None


@dataclass(frozen=True)
class GalleryPick:
    """The memories of one gallery category in one layer.

    Attributes:
        category: A key of :data:`CATEGORIES`.
        keys: The chosen keys, most interesting first (empty when the step did not run).
        note: One line for the reader: what was ranked and how many qualify, or ``"not run"``.
    """

    category: str
    keys: tuple[int, ...]
    note: str


class RunFolder:
    """A run folder written by ``ffkv-lens run``, complete or not.

    Its format and entries are those of :data:`ffkv_lens.storage.layout.RUN` (:attr:`paths`).

    Args:
        path: The folder (``--out`` of the run).

    Raises:
        RunFolderError: The folder does not exist or holds no ``manifest.json``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.paths = RunPaths(self.path)
        if not self.path.is_dir():
            what = "is not a folder" if self.path.exists() else "does not exist"
            raise RunFolderError(f"run folder {str(path)!r} {what}; pass the folder given to `ffkv-lens run --out`.")
        if not self.paths.manifest.is_file():
            raise RunFolderError(
                f"{str(path)!r} is not a run folder (no manifest.json); pass the folder given to `ffkv-lens run --out`."
            )
        self.manifest: dict[str, Any] = read_json(self.paths.manifest)
        if not RUN.owns(self.manifest):
            found = self.manifest.get("format") if isinstance(self.manifest, dict) else type(self.manifest).__name__
            raise RunFolderError(
                f"{str(path)!r} holds a manifest.json of format {found!r}, not an ffkv-lens run ({RUN.prefix}...); "
                "pass the folder given to `ffkv-lens run --out`."
            )
        check_run_manifest(self.manifest, self.paths.manifest)
        self._tables: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r}, status={self.manifest.get('status')!r}, steps={sorted(self.steps)})"

    @property
    def steps(self) -> dict[str, Any]:
        """Finished steps: ``{name: {"seconds": ..., ...}}``."""
        return self.manifest.get("steps", {})

    def done(self, step: str) -> bool:
        """Whether the step finished."""
        return step in self.steps

    @property
    def complete(self) -> bool:
        """Every analysis step finished (the report step itself may still be running)."""
        return self.manifest.get("status") == "finished" or all(self.done(s) for s in ANALYSIS_STEPS)

    def table(self, name: str) -> Any:
        """``tables/<name>.csv`` as a DataFrame, or None when it was not written.

        Raises:
            DamagedFileError: The file is not a CSV table or lacks the columns (and number types) readers use.
        """
        if name not in self._tables:
            path = self.paths.table(name)
            # Only "\n" ends a row: a decoded token "\r" is written unquoted by to_csv.
            frame = read_table(path, lineterminator="\n", fix=RUN_FIX) if path.is_file() else None
            self._tables[name] = None if frame is None else _check_table(name, frame, path)
        return self._tables[name]

    def settings(self, name: str) -> dict[str, Any] | None:
        """``tables/<name>_settings.json``, or None."""
        path = self.paths.settings(name)
        return field({"settings": read_json(path)}, "settings", dict, path, fix=RUN_FIX) if path.is_file() else None

    def figure(self, name: str) -> Path | None:
        """``figures/<name>.svg`` (else ``.png``), or None when it was not drawn."""
        for suffix in (".svg", ".png"):
            path = self.paths.figure(name, suffix)
            if path.is_file():
                return path
        return None

    @cached_property
    def atlas(self) -> Any:
        """The trigger atlas (decodes offline with its saved tokenizer)."""
        from ffkv_lens.analysis.atlas import TriggerAtlas

        if not (self.paths.atlas / MANIFEST).is_file():
            raise RunFolderError(
                f"{self.path} has no trigger atlas yet (run status {self.manifest.get('status')!r}, steps done: "
                f"{sorted(self.steps) or 'none'}); finish the run by re-running the same `ffkv-lens run` command."
            )
        return TriggerAtlas.load(self.paths.atlas)

    @cached_property
    def projection(self) -> Any:
        """The value projection, or None when the ``values`` step did not run."""
        from ffkv_lens.analysis.values import ValueProjection

        if not (self.paths.values / MANIFEST).is_file():
            return None
        return ValueProjection.load(self.paths.values, tokenizer=self.atlas.tokenizer)

    def check_memory(self, layer: int, key: int, sign: int = 1) -> None:
        """Raise :class:`ConfigError` naming the valid range when (layer, key, sign) is not in the atlas."""
        atlas = self.atlas
        layers = atlas.layers
        if layer not in layers:
            span = f"{layers[0]} to {layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else layers
            raise ConfigError(f"layer {layer} is out of range; this run has layers {span}: pass one of them.")
        if not 0 <= key < atlas.d_mlp:
            raise ConfigError(
                f"key {key} is out of range; layer {layer} has keys 0 to {atlas.d_mlp - 1} (d_mlp {atlas.d_mlp}): "
                "pass one of them."
            )
        if sign not in (1, -1):
            raise ConfigError(f"sign {sign!r} is not allowed; use 1 (top-k examples) or -1 (bottom-k).")
        if sign == -1 and not atlas.signed:
            raise ConfigError(
                "sign -1 needs bottom-k trigger examples, but this run's atlas kept only the top-k (it was run "
                "with --unsigned); use sign 1, or re-run without --unsigned."
            )

    def card(self, layer: int, key: int, *, sign: int = 1, examples: int = 5) -> MemoryCard:
        """Gather one memory: its first ``examples`` trigger examples, its value's tokens, its table rows."""
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
            raise ConfigError(f"examples={examples!r}; pass a positive integer.")
        self.check_memory(layer, key, sign)
        atlas = self.atlas
        found = atlas.examples(layer, key, sign=sign)
        views = []
        for rank, example in enumerate(found[:examples]):
            before, peak = atlas.prefix_parts(example)
            views.append(
                ExampleView(
                    rank,
                    example.position,
                    example.coefficient,
                    before,
                    peak,
                    example.next_token,
                    example.unit_id,
                    example.doc_id,
                )
            )
        top, bottom, max_prob = self._value_tokens(layer, key)
        return MemoryCard(
            layer=layer,
            key=key,
            sign=sign,
            examples=tuple(views),
            kept=len(found),
            top_tokens=top,
            bottom_tokens=bottom,
            max_prob=max_prob,
            agreement=self._row("agreement_per_memory", layer, key) if sign == 1 else None,
            mutation=self._row("mutation_per_key", layer, key) if sign == 1 else None,
            causal=self._row("causal_per_memory", layer, key) if sign == 1 else None,
        )

    def _value_tokens(self, layer: int, key: int) -> tuple[Any, Any, float | None]:
        projection = self.projection
        if projection is None or layer not in projection.top_ids:
            return None, None, None
        decode = self.atlas.tokenizer.batch_decode

        def pairs(ids: Any, logits: Any) -> tuple[tuple[str, float], ...]:
            ids = ids[key].tolist()
            return tuple(zip(decode([[t] for t in ids]), logits[key].tolist(), strict=True))

        top = pairs(projection.top_ids[layer], projection.top_logits[layer])
        bottom = pairs(projection.bottom_ids[layer], projection.bottom_logits[layer])
        return top, bottom, float(projection.max_prob[layer][key])

    def _row(self, table: str, layer: int, key: int) -> dict[str, Any] | None:
        frame = self.table(table)
        if frame is None:
            return None
        rows = frame[(frame["layer"] == layer) & (frame["key"] == key)]
        return None if rows.empty else rows.iloc[0].to_dict()

    def gallery(self, layer: int, per_category: int = 3) -> list[GalleryPick]:
        """The most interesting memories of ``layer``, ``per_category`` per :data:`CATEGORIES` entry.

        Agreement: agreeing memories first, then by the rank of the top trigger's next token in the
        value (so a layer without agreement shows its closest memories). Precision: by precision@k,
        then rank. Shallow and semantic: the tested keys with the highest and lowest mutation
        ``shallow_score``, never the same key twice. Most causal: the sampled memories by causal score.
        """
        picks = []
        tables = {"agreement": "agreement_per_memory", "mutation": "mutation_per_key", "causal": "causal_per_memory"}
        for name, (_, step) in CATEGORIES.items():
            frame = self.table(tables[step])
            if frame is None:
                picks.append(GalleryPick(name, (), "not run"))
                continue
            frame = frame[frame["layer"] == layer]
            picks.append(_pick(name, frame, per_category, picks))
        return picks


def check_run_manifest(m: dict[str, Any], path: Path) -> None:
    """Raise :class:`DamagedFileError` unless the run manifest's fields have the types readers rely on.

    Sections (``config``, ``layout``, ...) may be absent (a run that stopped early) but not ``null``.
    """
    for name in ("config", "model", "layout", "corpus", "versions", "steps", "distributed", "identity"):
        field(m, name, dict, path, optional=name not in m, fix=RUN_FIX)
    for name in ("status", "started", "finished", "format"):
        field(m, name, str, path, optional=name not in m, fix=RUN_FIX)
    field(m.get("config") or {}, "config.model", str, path, optional=True, fix=RUN_FIX)
    field(m.get("config") or {}, "config.corpus", str, path, optional=True, fix=RUN_FIX)
    for name in ("n_layers", "d_mlp", "d_vocab"):
        field(m.get("layout") or {}, f"layout.{name}", int, path, low=1, optional=True, fix=RUN_FIX)
    if m.get("layout") is not None and not isinstance((m.get("config") or {}).get("model"), str):
        raise DamagedFileError(f"{path}: 'config.model' is missing although the run has a layout; {RUN_FIX}.")
    field(m.get("corpus") or {}, "corpus.fingerprint", str, path, optional=True, fix=RUN_FIX)
    field(m.get("corpus") or {}, "corpus.name", str, path, optional=True, fix=RUN_FIX)
    for step in m.get("steps") or {}:
        info = field(m["steps"], f"steps.{step}", dict, path, fix=RUN_FIX)
        field(info, f"steps.{step}.seconds", float, path, low=0, optional=True, fix=RUN_FIX)


def _check_table(name: str, frame: Any, path: Path) -> Any:
    ints, numbers, strings = _TABLE_COLUMNS.get(name, (("layer",), (), ()))
    if name not in _TABLE_COLUMNS:
        numbers = tuple(c for c in frame.columns if str(c).endswith(("_ci_low", "_ci_high")))
    frame = check_columns(frame, path, ints=ints, numbers=numbers, strings=strings, fix=RUN_FIX)
    if "agrees" in strings:
        bad = frame["agrees"][~frame["agrees"].isna() & ~frame["agrees"].astype(str).isin(["True", "False"])]
        if len(bad):
            raise DamagedFileError(f"{path}: column 'agrees' holds {bad.iloc[0]!r}, not True or False; {RUN_FIX}.")
    return frame


def _pick(name: str, frame: Any, n: int, earlier: list[GalleryPick]) -> GalleryPick:
    if name == "agreement":
        counted = frame[frame["top1_next_token_id"].notna()].assign(agree=frame["agrees"].astype("boolean"))
        ranked = counted.sort_values(["agree", "precision_at_k", "rank", "key"], ascending=[False, False, True, True])
        note = (
            f"{int(counted['agree'].sum())} of {len(counted)} memories agree; ranked by agreement, "
            "precision@k, then the rank of the next token in the value"
        )
    elif name == "precision":
        ranked = frame[frame["precision_at_k"] > 0].sort_values(
            ["precision_at_k", "rank", "key"], ascending=[False, True, True]
        )
        note = f"{len(ranked)} of {len(frame)} memories have precision@k above 0"
    elif name == "causal":
        ranked = frame.sort_values(["causal_score", "key"], ascending=[False, True])
        note = (
            f"{len(frame)} memories sampled; ranked by causal score (mean drop of log p(next token) when the memory "
            "is zeroed on its triggers, minus its matched controls')"
        )
    else:
        tested = frame.sort_values(["shallow_score", "key"], ascending=[name == "semantic", True])
        if name == "shallow":
            tested = tested.head(math.ceil(len(tested) / 2))
        else:
            taken = {k for pick in earlier if pick.category == "shallow" for k in pick.keys}
            tested = tested[~tested["key"].isin(taken)]
        ranked = tested
        note = f"{len(frame)} keys tested; ranked by shallow_score (change_random - change_last)"
    return GalleryPick(name, tuple(int(k) for k in ranked["key"].head(n)), note)


def printable(text: str) -> str:
    """Text safe for a terminal: control characters (escape sequences included) shown escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def format_card(card: MemoryCard, *, color: bool) -> str:
    """A memory for the terminal; the peak token in reverse video (``color``) or ``[[...]]``."""
    mark = ("\x1b[1;7m", "\x1b[0m") if color else ("[[", "]]")
    side = "top-k" if card.sign == 1 else "bottom-k (most negative)"
    lines = [f"layer {card.layer}, key {card.key}: {side} trigger examples, {len(card.examples)} of {card.kept} kept"]
    if card.top_tokens is None:
        lines.append("value tokens: not run (the run's values step did not finish)")
    else:
        for title, tokens in (("top", card.top_tokens), ("bottom", card.bottom_tokens or ())):
            shown = "  ".join(f"{printable(repr(t))} {logit:+.3g}" for t, logit in tokens)
            lines.append(f"value {title} tokens (logit): {shown}")
        lines.append(f"value max probability: {card.max_prob:.3g}")
    if card.agreement is not None:
        lines.append(_agreement_line(card))
    if card.mutation is not None:
        m = card.mutation
        lines.append(
            f"mutation test: {m['kind']} (shallow_score {m['shallow_score']:+.3f}; change first "
            f"{m['change_first']:+.3f}, last {m['change_last']:+.3f}, random {m['change_random']:+.3f})"
        )
    if card.causal is not None:
        lines.append(causal_line(card.causal))
    lines.append(f"trigger examples (peak token in {'reverse video' if color else '[[...]]'}, -> next token):")
    for view in card.examples:
        nxt = "(unit end)" if view.next_token is None else printable(repr(view.next_token))
        text = f"{printable(view.before)}{mark[0]}{'<BOS>' if view.position < 0 else printable(view.peak)}{mark[1]}"
        lines.append(f"  {view.rank + 1:>2}. m={view.coefficient:+.4g}  {text} -> {nxt}")
    if not card.examples:
        lines.append("  (none: the search saw no unit for this key)")
    return "\n".join(lines)


def causal_line(row: dict[str, Any]) -> str:
    """A memory's causal score and the effects behind it, on one line."""
    return (
        f"causal score {row['causal_score']:+.4g} (zeroed on {int(row['n_examples'])} trigger examples: "
        f"log p(next) {row['total_next']:+.4g} vs control {row['control_total_next']:+.4g}, clean - ablated)"
    )


def _agreement_line(card: MemoryCard) -> str:
    row = card.agreement or {}
    if _missing(row.get("top1_next_token_id")) or not card.examples:
        return "agreement: not counted (the top trigger example ends its unit: no next token)"
    agrees = "yes" if str(row["agrees"]) == "True" else "no"
    precision = "n/a" if _missing(row["precision_at_k"]) else f"{row['precision_at_k']:.2f}"
    value = "?" if not card.top_tokens else printable(repr(card.top_tokens[0][0]))
    return (
        f"agreement: {agrees} (value top token {value}, top-1 next token "
        f"{printable(repr(card.examples[0].next_token))} at rank {int(row['rank'])} in the value); "
        f"precision@k {precision}"
    )


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
