"""report.html: self-contained, every figure and table, the memory gallery, escaping, missing steps."""

import base64
import html
import json
import re
from html.parser import HTMLParser

import pytest

from ffkv_lens.analysis.atlas import TriggerExample
from ffkv_lens.report import RunFolder, write_report
from ffkv_lens.report.figures import FIGURES
from ffkv_lens.report.html import _card, _number
from ffkv_lens.report.memories import ANALYSIS_STEPS, CATEGORIES, ExampleView, MemoryCard
from ffkv_lens.storage.layout import RUN_STEPS as STEPS
from tests.report.runs import HOSTILE, build_tiny_run, copy_run, without_stats

TAGS = {
    "html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3", "h4", "p", "code", "nav", "a",
    "main", "section", "table", "tr", "td", "th", "small", "div", "span", "details", "summary", "pre", "figure",
    "img", "figcaption", "article", "ol", "li", "mark", "footer", "b", "svg", "g", "rect", "line", "text",
}  # fmt: skip


class _Page(HTMLParser):
    """Every start tag with its attributes, and the text inside each <section id=...>."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.sections: dict[str, str] = {}
        self._section: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "section":
            self._section = attrs["id"]
            self.sections[self._section] = ""

    def handle_data(self, data: str) -> None:
        if self._section is not None:
            self.sections[self._section] += data


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


@pytest.fixture(scope="module")
def run_dir(tiny_folder, tmp_path_factory):
    return build_tiny_run(tiny_folder("gpt2"), tmp_path_factory.mktemp("report-run"))


@pytest.fixture(scope="module")
def page(run_dir) -> str:
    return (run_dir / "report.html").read_text(encoding="utf-8")


def test_pipeline_steps_and_report_steps_agree() -> None:
    assert set(STEPS) == {*ANALYSIS_STEPS, "report"}


def test_report_is_self_contained(page) -> None:
    parsed = _parse(page)
    assert {tag for tag, _ in parsed.tags} <= TAGS  # no script, link, iframe, object ...
    lowered = page.lower()
    for needle in ('src="http', "src='http", 'src="//', "<link", "<script", "@import", "url(", "@font-face"):
        assert needle not in lowered, needle
    for tag, attrs in parsed.tags:
        if "src" in attrs:
            assert attrs["src"].startswith("data:image/svg+xml;base64,"), (tag, attrs["src"][:40])
        if "href" in attrs:
            assert attrs["href"].startswith("#"), attrs["href"]


def test_every_figure_and_table_is_present(page, run_dir) -> None:
    parsed = _parse(page)
    images = {attrs.get("id"): attrs for tag, attrs in parsed.tags if tag == "figure"}
    assert set(images) == {f"figure-{name}" for name in FIGURES}
    sources = [attrs["src"] for tag, attrs in parsed.tags if tag == "img"]
    assert len(sources) == len(FIGURES)
    for src in sources:
        assert base64.b64decode(src.split(",", 1)[1]).lstrip().startswith(b"<?xml")
    sections = parsed.sections
    for column in ("change_last", "agreement_rate", "median_rank", "active_fraction", "resid_matches_final"):
        assert column in page
    assert sections["agreement"].count("Per layer") == 2  # paper variant and signed
    assert "Fig 3" in sections["mutation"] and "Fig 4" in sections["agreement"]
    assert "Fig 7-8" in sections["composition"] and "Fig 9-11" in sections["residual"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    settings = sections["settings"]
    assert manifest["corpus"]["fingerprint"] in settings and manifest["versions"]["torch"] in settings
    for step in STEPS:
        assert step in settings
    assert "not run" not in page


def test_gallery_shows_cards_with_the_peak_highlighted(page, run_dir) -> None:
    run = RunFolder(run_dir)
    gallery = _parse(page).sections["gallery"]
    for layer in run.atlas.layers:
        for title, _ in CATEGORIES.values():
            assert f"Layer {layer}: {title}" in gallery
    picks = {pick.category: pick for pick in run.gallery(0)}
    assert picks["shallow"].keys and picks["semantic"].keys
    assert not set(picks["shallow"].keys) & set(picks["semantic"].keys)
    tested = run.table("mutation_per_key")
    assert set(picks["shallow"].keys) <= set(tested[tested["layer"] == 0]["key"])
    sampled = run.table("causal_per_memory")
    assert picks["causal"].keys and set(picks["causal"].keys) <= set(sampled[sampled["layer"] == 0]["key"])
    best = sampled[sampled["layer"] == 0].sort_values("causal_score", ascending=False)["key"].iloc[0]
    assert picks["causal"].keys[0] == best
    assert run.card(0, int(best)).causal["causal_score"] == sampled["causal_score"][sampled["layer"] == 0].max()
    card = run.card(0, picks["shallow"].keys[0], examples=5)
    assert card.mutation is not None and card.top_tokens and len(card.top_tokens) == 10
    view = card.examples[0]
    marked = f'{html.escape(view.before)}<mark class="peak">{html.escape(view.peak)}</mark>'
    assert view.peak and marked in page
    assert page.count('<mark class="peak">') >= 3 * len(run.atlas.layers)


def test_prefix_parts_concatenate_to_the_prefix(run_dir) -> None:
    atlas = RunFolder(run_dir).atlas
    for key in range(atlas.d_mlp):
        for example in atlas.examples(1, key):
            before, peak = atlas.prefix_parts(example)
            assert before + peak == example.prefix and peak
    bos = TriggerExample(example.unit_id, example.doc_id, -1, 1.0, "", None, None)
    assert atlas.prefix_parts(bos) == ("", "")


def test_corpus_text_and_names_are_escaped(page) -> None:
    assert "&lt;script&gt;" in page  # the corpus file's name, in the settings
    view = ExampleView(0, 3, 2.5, HOSTILE, "<b>peak</b>", '"><script>', 1, 0)
    card = MemoryCard(1, 2, 1, (view,), 1, (("<script>", 1.0),), (("</ol>", -1.0),), 0.5, None, None)
    out = _card(card)
    assert "<script" not in out and "<b>" not in out and "</ol></ol>" not in out
    assert html.escape(HOSTILE) in out and "&lt;b&gt;peak&lt;/b&gt;" in out
    assert {tag for tag, _ in _parse(out).tags} <= {"article", "h4", "p", "ol", "li", "span", "mark", "code"}


def test_missing_step_is_reported_as_not_run(run_dir, tmp_path) -> None:
    folder = copy_run(
        run_dir, tmp_path / "no-mutation", drop_steps=("mutation", "report"),
        drop=("tables/mutation_*", "figures/mutation.*", "report.html"),
    )  # fmt: skip
    text = write_report(folder).read_text(encoding="utf-8")
    parsed = _parse(text)
    assert "not run" in parsed.sections["mutation"] and "change_last" not in parsed.sections["mutation"]
    assert "agreement_rate" in parsed.sections["agreement"]
    assert "run unfinished" in text and re.search(r"mutation\s*not run", parsed.sections["settings"])
    gallery = parsed.sections["gallery"]
    assert gallery.count("not run") == len(RunFolder(folder).atlas.layers) * 2  # shallow + semantic per layer
    assert {f"figure-{n}" for n in FIGURES if n != "mutation"} <= {a.get("id") for t, a in parsed.tags}


def test_run_without_the_causal_step_still_reports(run_dir, tmp_path) -> None:
    """A run folder made before the causal step existed: no step record, no tables, no figure."""
    folder = copy_run(
        run_dir, tmp_path / "no-causal", drop_steps=("causal", "report"),
        drop=("tables/causal_*", "figures/causal.*", "report.html"),
    )  # fmt: skip
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["status"] = "finished"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    parsed = _parse(write_report(folder).read_text(encoding="utf-8"))
    assert "not run" in parsed.sections["causal"] and "share_beats_control" not in parsed.sections["causal"]
    assert parsed.sections["gallery"].count("not run") == len(RunFolder(folder).atlas.layers)
    assert RunFolder(folder).card(0, 0).causal is None


def test_only_the_trigger_search_done(run_dir, tmp_path) -> None:
    later = ("values", "agreement", "causal", "mutation", "dynamics", "figures", "report")
    folder = copy_run(run_dir, tmp_path / "early", drop_steps=later, drop=("values", "tables", "figures"))
    parsed = _parse(write_report(folder).read_text(encoding="utf-8"))
    for section in ("mutation", "agreement", "causal", "composition", "residual"):
        assert "not run" in parsed.sections[section]
    assert parsed.sections["gallery"].count("not run") == len(CATEGORIES) * len(RunFolder(folder).atlas.layers)
    empty = copy_run(run_dir, tmp_path / "empty", drop_steps=("triggers", *later), drop=("atlas", "values"))
    assert "not run" in _parse(write_report(empty).read_text(encoding="utf-8")).sections["gallery"]


def test_cards_without_the_value_projection(run_dir, tmp_path) -> None:
    folder = copy_run(run_dir, tmp_path / "no-values", drop_steps=("values", "report"), drop=("values",))
    gallery = _parse(write_report(folder).read_text(encoding="utf-8")).sections["gallery"]
    assert "value tokens: not run" in gallery and "value top" not in gallery


@pytest.mark.parametrize(
    ("value", "text"),
    [(float("nan"), "–"), (3, "3"), (12345.0, "12,345"), (137.5, "137.5"), (0.39583, "0.396"), (0.00196, "0.00196"),
     (2.03e-5, "2.03e-05"), (2.7e-17, "0"), (-0.5538, "-0.554"), (True, "True")],
    ids=["nan", "int", "integral-float", "large", "fraction", "small", "tiny", "noise", "negative", "bool"],
)  # fmt: skip
def test_number_format(value, text) -> None:
    assert _number(value) == text


_CARD = re.compile(r'<article class="card"><h4>L(\d+) · key (\d+)</h4>(.*?)</article>', re.S)
_BAR = re.compile(r'<rect x="[-0-9.]+" y="[-0-9.]+" width="[-0-9.]+" height="([-0-9.]+)"')


def test_gallery_cards_carry_the_memory_histogram(page, run_dir) -> None:
    atlas = RunFolder(run_dir).atlas
    cards = _CARD.findall(page)
    assert cards and atlas.has_stats
    for layer, key, body in cards:
        counts = [c for c in atlas.histograms(int(layer))[int(key)].tolist() if c > 0]  # empty bins draw nothing
        assert body.count('<svg class="histogram"') == 1, (layer, key)
        heights = [float(h) for h in _BAR.findall(body)]
        assert len(heights) == len(counts)
        for h, c in zip(heights, counts, strict=True):  # linear count scale, to the drawing's 0.01 px
            assert abs(h - max(heights) * c / max(counts)) <= 0.01
        density = atlas.stats(int(layer), int(key)).iloc[0]["density"]
        assert f"density {density:.3g}" in body


def test_report_of_a_run_without_statistics_notes_them_not_recorded(run_dir, tmp_path) -> None:
    old = without_stats(run_dir, tmp_path / "old")
    text = (write_report(old)).read_text(encoding="utf-8")
    cards = _CARD.findall(text)
    assert cards and all("histogram: not recorded in this run" in body for _, _, body in cards)
    assert "<svg" not in text
