"""The memory browser in a real headless Chromium: playwright drives the system chromium.

Skipped when the ``playwright`` package or a chromium binary is missing (``make setup`` installs
both where it can; ``FFKV_CHROMIUM`` names another binary).
"""

import json
import os
import shutil
from collections.abc import Iterator

import pytest

from ffkv_lens.browser import BrowserIndex

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install playwright (in the dev extra)"
)
CHROMIUM = os.environ.get("FFKV_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None, reason="no chromium binary: apt-get install chromium (or set FFKV_CHROMIUM=/path/to/chrome)"
    ),
]
expect = sync_api.expect
COEF_TOL = 5e-4 + 1e-9  # the page shows coefficients with 3 decimals


def _visible(token: str | None) -> str:
    """The page's display of a token (leading/trailing spaces as ␣, newlines as ⏎, tabs as ⇥)."""
    if token is None:
        return "∅"
    core = token.strip(" ")
    if not core:
        return "␣" * len(token)
    lead, trail = len(token) - len(token.lstrip(" ")), len(token) - len(token.rstrip(" "))
    shown = "␣" * lead + core + "␣" * trail
    return shown.replace("\n", "⏎").replace("\t", "⇥")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: the tests may run as root (containers), where chromium's sandbox cannot start.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser, server) -> Iterator[tuple[object, list[str]]]:
    """A fresh page and the console errors, page errors and dialogs it produced."""
    yield from _watched_tab(browser)


@pytest.fixture()
def compare_page(browser, compare_server) -> Iterator[tuple[object, list[str]]]:
    """A fresh page (and its problems) for the server of the two-run comparison."""
    yield from _watched_tab(browser)


def _watched_tab(browser) -> Iterator[tuple[object, list[str]]]:
    tab = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    tab.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    tab.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    tab.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    yield tab, problems
    tab.close()


def _title(tab, layer: int, key: int) -> None:
    expect(tab.locator("#memory-title")).to_have_text(f"Layer {layer} · key {key}")
    expect(tab.locator("body")).to_have_attribute("data-pending", "0")


_ROWS_JS = """rows => rows.map(r => ({
    before: r.querySelector('.before').textContent, peak: r.querySelector('mark.peak').textContent,
    next: r.querySelector('.next').textContent, coef: r.querySelector('.coef').textContent}))"""


def test_memory_shows_the_atlas_examples_and_steps_keys(page, server, tiny_atlas) -> None:
    tab, problems = page
    tokenizer = tiny_atlas.tokenizer
    layer, key = tiny_atlas.layers[1], 7
    tab.goto(f"{server.url}#layer={layer}&key={key}")
    _title(tab, layer, key)
    for sign, body in ((1, "#examples-top"), (-1, "#examples-bottom")):
        expected = tiny_atlas.examples(layer, key, sign=sign)
        rows = tab.locator(f"{body} tr.example")
        expect(rows).to_have_count(len(expected))
        for got, e in zip(rows.evaluate_all(_ROWS_JS), expected, strict=True):
            tokens = tiny_atlas.units.get(e.unit_id)[1]
            shorter = tokenizer.decode(tokens[: max(e.position, 0)])
            assert got["before"] + got["peak"] == e.prefix
            assert got["peak"] == e.prefix[len(os.path.commonprefix([shorter, e.prefix])) :]
            peak_alone = tokenizer.decode(tokens[e.position : e.position + 1]) if e.position >= 0 else ""
            if "\ufffd" not in peak_alone:  # a token that is a whole character (or several): shown as itself
                assert got["peak"] == peak_alone
            assert got["next"] == _visible(e.next_token)
            assert abs(float(got["coef"]) - e.coefficient) <= COEF_TOL
    highlight = tab.locator("#examples-top mark.peak").first.evaluate("m => getComputedStyle(m).backgroundColor")
    assert highlight not in ("rgba(0, 0, 0, 0)", "transparent"), "the peak token is not highlighted"
    tab.click("#next-key")
    _title(tab, layer, key + 1)
    assert tab.evaluate("location.hash") == f"#layer={layer}&key={key + 1}"
    tab.click("#layer-up")
    _title(tab, tiny_atlas.layers[2], key + 1)
    expect(tab.locator("#run")).to_be_hidden()  # one run: no run selector, no matches panel
    expect(tab.locator("#matches-box")).to_be_hidden()
    assert problems == []


def test_memory_page_shows_the_causal_score(page, server, tiny_run) -> None:
    import pandas as pd

    tab, problems = page
    table = pd.read_csv(tiny_run / "tables" / "causal_per_memory.csv")
    row = table.iloc[0]
    layer, key = int(row["layer"]), int(row["key"])
    tab.goto(f"{server.url}#layer={layer}&key={key}")
    _title(tab, layer, key)
    score = tab.locator("#scores div", has_text="causal score").locator("dd")
    expect(score).to_have_text(f"{row['causal_score']:.4f}")
    unsampled = next(k for k in range(64) if k not in set(table[table["layer"] == layer]["key"]))
    tab.goto(f"{server.url}#layer={layer}&key={unsampled}")
    _title(tab, layer, unsampled)
    expect(score).to_have_text("not sampled")
    assert problems == []


def test_token_search_then_click_through_to_the_memory(page, server, tiny_index) -> None:
    tab, problems = page
    with BrowserIndex(tiny_index) as index:
        firsts = [json.loads(t)[0] for (t,) in index.conn.execute("SELECT top_tokens FROM memories ORDER BY id")]
        token = next(t for t in firsts if t.strip().isalpha())
        found = index.search_token(token.strip())["results"]
    target = next(r for r in found if (r["layer"], r["key"]) != (0, 0))
    tab.goto(server.url)
    _title(tab, 0, 0)
    tab.fill("#q", token.strip())
    tab.select_option("#mode", "token")
    tab.click("#search-go")
    links = tab.locator("#results-list a.memory-link")
    expect(links).to_have_count(len(found))
    shown = links.evaluate_all("as => as.map(a => [Number(a.dataset.layer), Number(a.dataset.key)])")
    assert shown == [[r["layer"], r["key"]] for r in found], "the page does not show the API's ranking"
    tab.locator(f'#results-list a[data-layer="{target["layer"]}"][data-key="{target["key"]}"]').click()
    _title(tab, target["layer"], target["key"])
    chips = tab.locator("#value-top .tok").evaluate_all("bs => bs.map(b => b.firstChild.textContent)")
    assert _visible(target["token"]) in chips
    assert "q=" in tab.evaluate("location.hash") and tab.locator("#results").is_visible(), "search state lost"
    assert problems == []


def test_text_search_lists_memories_and_escapes_input(page, server, tiny_index, tiny_atlas) -> None:
    tab, problems = page
    layer, key = tiny_atlas.layers[-1], 5
    words = " ".join([w for w in tiny_atlas.examples(layer, key)[0].prefix.split() if w.isalpha()][-2:])
    with BrowserIndex(tiny_index) as index:
        found = index.search_text(words)["results"]
    assert found, words  # that the memory itself is among them is checked with limit=500 in test_index.py
    tab.goto(f"{server.url}#layer=0&key=1")
    _title(tab, 0, 1)
    tab.fill("#q", words)
    tab.select_option("#mode", "text")
    tab.press("#q", "Enter")
    links = tab.locator("#results-list a.memory-link")
    expect(links).to_have_count(len(found))
    shown = links.evaluate_all("as => as.map(a => [Number(a.dataset.layer), Number(a.dataset.key)])")
    assert shown == [[r["layer"], r["key"]] for r in found]
    expect(tab.locator("#results-list li.result mark.peak").first).to_be_visible()
    first = found[0]
    links.first.click()
    _title(tab, first["layer"], first["key"])
    hostile = "<img src=x onerror=alert(1)>"
    tab.fill("#q", hostile)
    tab.click("#search-go")
    expect(tab.locator("#results-title")).to_contain_text(hostile)
    assert tab.locator("#results img").count() == 0
    assert problems == []


def test_api_error_is_shown_not_thrown(page, server) -> None:
    tab, problems = page
    tab.goto(f"{server.url}#layer=0&key=999999")
    expect(tab.locator("#error")).to_contain_text("key=999999 is out of range")
    # The failed fetch is logged by the browser as a 400 resource error; nothing else may fail.
    assert all("status of 400" in p for p in problems), problems


_MATCHES_JS = """rows => rows.map(r => {
    const a = r.querySelector('a.match-link');
    return {run: r.querySelector('.match-run').textContent, link: [a.dataset.run, Number(a.dataset.layer),
            Number(a.dataset.key)], kind: r.querySelector('.match-kind').textContent,
            rank: Number(r.children[3].textContent), score: r.querySelector('.match-score').textContent,
            q: r.querySelector('.match-q').textContent, significant: r.querySelector('.match-sig').textContent,
            tokens: [...r.querySelectorAll('.tok')].map(t => t.textContent)};
})"""


def _expect_matches(tab, found: list[dict]) -> None:
    """The matches panel shows the API's matches, in order."""
    rows = tab.locator("#matches tr.match")
    expect(rows).to_have_count(len(found))
    for got, m in zip(rows.evaluate_all(_MATCHES_JS), found, strict=True):
        assert (got["run"], got["link"], got["kind"], got["rank"]) == (m["run"], [m["run"], m["layer"], m["key"]],
                                                                       m["kind"], m["rank"])  # fmt: skip
        assert abs(float(got["score"]) - m["score"]) <= COEF_TOL
        assert got["q"] == "–" if m["q_value"] is None else abs(float(got["q"]) - m["q_value"]) <= COEF_TOL
        assert got["significant"] == {True: "yes", False: "no", None: "–"}[m["significant"]]
        assert got["tokens"] == [_visible(t) for t in m["tokens"]]


def test_matches_panel_opens_the_matched_memory_in_the_other_run(
    compare_page, compare_server, labels, tiny_atlas
) -> None:
    tab, problems = compare_page
    catalog, (a, b) = compare_server.catalog, labels
    # A memory with a significant match where there is one (tests/browser/comparison.py makes some).
    memories = [(layer, key) for layer in tiny_atlas.layers[1:] for key in range(tiny_atlas.d_mlp)]
    layer, key = next(
        (m for m in memories if any(x["significant"] for x in catalog.matches(a, *m)["matches"])), memories[0]
    )
    tab.goto(f"{compare_server.url}#layer={layer}&key={key}")
    _title(tab, layer, key)
    expect(tab.locator("#run")).to_have_value(a)
    expect(tab.locator("#matches-box h2")).to_have_text("Matches in other models")
    found = catalog.matches(a, layer, key)["matches"]
    assert found and {m["run"] for m in found} == {b}
    _expect_matches(tab, found)
    target = found[-1]
    link = f'#matches a.match-link[data-layer="{target["layer"]}"][data-key="{target["key"]}"]'
    tab.locator(link).first.click()
    _title(tab, target["layer"], target["key"])
    expect(tab.locator("#run")).to_have_value(b)
    assert tab.evaluate("location.hash") == f"#run={b}&layer={target['layer']}&key={target['key']}"
    expect(tab.locator("#run-info")).to_contain_text(catalog.info[b]["model"])
    with BrowserIndex(catalog.runs[b].index) as index:
        memory = index.memory(target["layer"], target["key"])
    expect(tab.locator("#examples-top tr.example")).to_have_count(len(memory["examples"]["top"]))
    chips = tab.locator("#value-top .tok").evaluate_all("bs => bs.map(b => b.firstChild.textContent)")
    assert chips == [_visible(t["token"]) for t in memory["values"]["top"]], "not the other run's memory"
    back = catalog.matches(b, target["layer"], target["key"])["matches"]
    _expect_matches(tab, back)
    tab.locator("#matches a.match-link").first.click()  # into the default run: no run in the fragment
    _title(tab, back[0]["layer"], back[0]["key"])
    assert tab.evaluate("location.hash") == f"#layer={back[0]['layer']}&key={back[0]['key']}"
    expect(tab.locator("#run-info")).to_contain_text(catalog.info[a]["model"])
    tab.select_option("#run", b)  # the selector keeps the layer and key
    _title(tab, back[0]["layer"], back[0]["key"])
    assert tab.evaluate("location.hash") == f"#run={b}&layer={back[0]['layer']}&key={back[0]['key']}"
    expect(tab.locator("#run-info")).to_contain_text(catalog.info[b]["model"])
    assert problems == []


def check_report(browser, path) -> dict:
    """Open a report.html from disk; count figures that decoded and gallery cards; collect page errors."""
    tab = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    tab.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    tab.on("pageerror", lambda err: problems.append(str(err)))
    tab.on("request", lambda req: None if req.url.startswith(("file:", "data:")) else problems.append(req.url))
    tab.goto(path.resolve().as_uri())
    found = tab.evaluate(
        """() => ({
            figures: [...document.querySelectorAll('figure img')].map(i => i.complete && i.naturalWidth > 0),
            cards: document.querySelectorAll('article.card').length,
            peaks: document.querySelectorAll('article.card mark.peak').length,
        })"""
    )
    tab.close()
    return {**found, "problems": problems}


def test_report_opens_offline_with_every_figure_and_the_gallery(browser, tiny_run) -> None:
    found = check_report(browser, tiny_run / "report.html")
    assert found["problems"] == []  # no errors and no request beyond the file itself
    assert len(found["figures"]) == 7 and all(found["figures"])  # every figure (causal included) decoded and drawn
    assert found["cards"] > 0 and found["peaks"] >= found["cards"]


@pytest.fixture()
def prompt_page(browser, prompt_server) -> Iterator[tuple[object, list[str]]]:
    """A fresh page (and its problems) for the server with the Prompt page (tiny_run's model loaded)."""
    yield from _watched_tab(browser)


def _settled(tab) -> None:
    expect(tab.locator("body")).to_have_attribute("data-pending", "0")


def test_prompt_page_switches_a_memory_off_and_generates(prompt_page, prompt_server, tiny_prompt) -> None:
    tab, problems = prompt_page
    text = "Paris is the capital of"
    tab.goto(prompt_server.url)
    _settled(tab)
    tab.click("#prompt-link")
    expect(tab.locator("#prompt-page")).to_be_visible()
    expect(tab.locator("#memory")).to_be_hidden()
    tab.fill("#prompt-text", text)
    tab.click("#prompt-run")
    rows = tab.locator("#next-tokens tr.next-row")
    expect(rows).to_have_count(tiny_prompt.limits.default_top)
    _settled(tab)
    expect(tab.locator("#next-tokens .prob-edited").first).to_have_text("–")  # no edits yet
    before = rows.evaluate_all("rows => rows.map(r => r.dataset.tokenId + ' ' + r.textContent)")
    # Switch off the last layer's top memory (the largest contribution to the prediction there).
    chip = tab.locator("#prompt-layers tr.prompt-layer").last.locator(".mem").first
    layer, key = int(chip.get_attribute("data-layer")), int(chip.get_attribute("data-key"))
    chip.locator("button.mem-off").click()
    expect(tab.locator("#edits li.edit")).to_have_count(1)
    expect(tab.locator("#next-tokens .prob-edited").first).not_to_have_text("–")
    _settled(tab)
    assert tab.evaluate("location.hash") == "#" + f"prompt={text}&edits=zero:{layer}:{key}".replace(" ", "+").replace(
        ":", "%3A"
    )
    after = rows.evaluate_all("rows => rows.map(r => r.dataset.tokenId + ' ' + r.textContent)")
    assert after != before
    expected = tiny_prompt.trace({"text": text, "edits": [{"layer": layer, "keys": [key], "op": "zero"}]})["diff"]
    shown = tab.locator("#next-tokens td.change").all_text_contents()
    assert len(shown) == len(expected["next_tokens"])
    for got, want in zip(shown, expected["next_tokens"], strict=True):
        assert float(got) == pytest.approx(100 * want["change"], rel=0.06, abs=1e-12)  # 2 significant digits
    assert tab.locator("#next-tokens td.change.up, #next-tokens td.change.down").count() > 0
    # The switched-off memory is listed with a link to its page; generation runs with and without it.
    expect(tab.locator("#edits li.edit a.memory-link")).to_have_attribute("data-key", str(key))
    tab.fill("#gen-tokens", "4")
    tab.click("#prompt-generate")
    expect(tab.locator("#generation")).to_be_visible()
    _settled(tab)
    want = tiny_prompt.generate({"text": text, "edits": [{"layer": layer, "keys": [key]}], "max_new_tokens": 4})
    expect(tab.locator("#gen-original")).to_have_text(want["original"])
    expect(tab.locator("#gen-edited")).to_have_text(want["edited"])
    # Removing the edit brings back the unedited table.
    tab.click("#edits button.edit-remove")
    expect(tab.locator("#next-tokens .prob-edited").first).to_have_text("–")
    _settled(tab)
    assert problems == []


def test_memory_page_try_it_opens_the_prompt_with_the_memory_ablated(prompt_page, prompt_server, tiny_atlas) -> None:
    tab, problems = prompt_page
    layer, key = tiny_atlas.layers[1], 3
    tab.goto(f"{prompt_server.url}#layer={layer}&key={key}")
    _title(tab, layer, key)
    top = tiny_atlas.examples(layer, key)[0]
    expect(tab.locator("#try-it")).to_be_visible()
    tab.click("#try-it")
    expect(tab.locator("#prompt-page")).to_be_visible()
    expect(tab.locator("#prompt-text")).to_have_value(top.prefix)
    expect(tab.locator("#edits li.edit")).to_have_count(1)
    expect(tab.locator("#edits li.edit")).to_contain_text(f"L{layer} K{key} off")
    expect(tab.locator("#next-tokens .prob-edited").first).not_to_have_text("–")
    _settled(tab)
    tab.locator("#prompt-layers a.memory-link").first.click()  # a memory of the trace opens its page
    expect(tab.locator("#memory")).to_be_visible()
    expect(tab.locator("#prompt-page")).to_be_hidden()
    _settled(tab)
    assert problems == []


def test_without_a_model_there_is_no_prompt_page(page, server) -> None:
    tab, problems = page
    tab.goto(f"{server.url}#layer=0&key=1")
    _title(tab, 0, 1)
    expect(tab.locator("#prompt-link")).to_be_hidden()
    expect(tab.locator("#try-it")).to_be_hidden()
    tab.goto(f"{server.url}#prompt=hello")
    expect(tab.locator("#error")).to_contain_text("started without a model")
    assert problems == []
