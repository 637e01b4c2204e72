"""Build time of the browser index on a real run folder, and the latency of each API query type.

Measures, on RUN_DIR (e.g. a SmolLM2 run: 30 layers x 1536 keys x 50 examples x 2 signs):

- ``build``: a full rebuild of ``RUN_DIR/browser.sqlite`` (wall seconds, file size, bytes per example,
  MB per table from SQLite's dbstat), against the baseline of decoding every example one by one with
  ``TriggerAtlas.examples`` (timed on a sample of memories in the same run, extrapolated to all examples).
- ``parity``: index text vs ``TriggerAtlas.examples`` on a random sample of memories (must be 0 mismatches).
- ``queries``: end-to-end HTTP latency (new connection per request, as the page makes them) of
  each route, on distinct random arguments, after a warm-up: median, p90 and max in milliseconds.
- optionally a screenshot of the page (``--screenshot``; needs playwright and chromium).

Usage:
    python benchmarks/browser_queries.py RUN_DIR --out browser.json [--repeats 25]
        [--screenshot docs/figures/browser.png]
"""

import argparse
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ffkv_lens.browser import BrowserIndex, BrowserServer, open_index  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--repeats", type=int, default=25, help="distinct queries per route")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--baseline-memories", type=int, default=20, help="memories decoded one example at a time")
    parser.add_argument("--parity-memories", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--screenshot", type=Path, default=None, help="PNG of the page (needs playwright)")
    parser.add_argument("--chromium", default=os.environ.get("FFKV_CHROMIUM", "/usr/bin/chromium"))
    return parser.parse_args(argv)


def time_build(run_dir: Path) -> dict:
    start = time.perf_counter()
    path = open_index(run_dir, rebuild=True)
    seconds = time.perf_counter() - start
    with BrowserIndex(path) as index:
        meta = index.info()
    keep = ("n_examples", "n_contexts", "n_units", "units_by_offsets", "layers", "d_mlp", "k", "model")
    size = path.stat().st_size
    return {
        "seconds": round(seconds, 2), "size_mb": round(size / 2**20, 1),
        "bytes_per_example": round(size / max(meta["n_examples"], 1), 1), "tables_mb": table_sizes(path),
    } | {k: meta[k] for k in keep}  # fmt: skip


def table_sizes(path: Path) -> dict[str, float]:
    """Megabytes (10**6 bytes) per table and index, from SQLite's dbstat (empty when SQLite lacks it)."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT name, SUM(pgsize) AS size FROM dbstat GROUP BY name ORDER BY size DESC").fetchall()
    except sqlite3.OperationalError:
        rows = []
    finally:
        conn.close()
    return {name: round(size / 1e6, 1) for name, size in rows}


def time_baseline(atlas, n_memories: int, n_examples: int, rng: random.Random) -> dict:
    """Decode examples one by one (TriggerAtlas.examples) on a sample; extrapolate to the whole atlas."""
    picks = [(rng.choice(atlas.layers), rng.randrange(atlas.d_mlp)) for _ in range(n_memories)]
    start = time.perf_counter()
    done = sum(len(atlas.examples(layer, key, sign=sign)) for layer, key in picks for sign in (1, -1))
    seconds = time.perf_counter() - start
    return {
        "sample_examples": done,
        "sample_seconds": round(seconds, 3),
        "extrapolated_seconds": round(seconds / done * n_examples, 1),
    }


def check_parity(index_path: Path, atlas, n_memories: int, rng: random.Random) -> dict:
    picks = [(rng.choice(atlas.layers), rng.randrange(atlas.d_mlp)) for _ in range(n_memories)]
    checked = mismatches = 0
    with BrowserIndex(index_path) as index:
        for layer, key in picks:
            shown = index.memory(layer, key)["examples"]
            for sign, side in ((1, "top"), (-1, "bottom")):
                for got, want in zip(shown[side], atlas.examples(layer, key, sign=sign), strict=True):
                    checked += 1
                    same = (got["prefix"], got["next_token"], got["unit_id"], got["position"]) == (
                        want.prefix, want.next_token, want.unit_id, want.position,
                    )  # fmt: skip
                    mismatches += not same
    return {"memories": n_memories, "examples": checked, "mismatches": mismatches}


def query_plans(index_path: Path, n: int, rng: random.Random) -> dict[str, list[dict]]:
    """Distinct random arguments per route, drawn from the index itself."""
    conn = sqlite3.connect(f"{index_path.resolve().as_uri()}?mode=ro", uri=True)
    meta = {name: json.loads(value) for name, value in conn.execute("SELECT name, value FROM meta")}
    layers, d_mlp = meta["layers"], meta["d_mlp"]
    rows = conn.execute("SELECT top_tokens FROM memories ORDER BY random() LIMIT ?", (4 * n,)).fetchall()
    tops = [json.loads(r[0]) for r in rows if r[0]]
    words = [t.strip() for toks in tops for t in toks if t.strip().isalpha()]
    prefixes = [r[0] for r in conn.execute("SELECT prefix FROM contexts ORDER BY random() LIMIT ?", (4 * n,))]
    phrases = [" ".join(p.split()[-3:-1]) for p in prefixes if len(p.split()) >= 3][:n]
    common = conn.execute(  # the tokens in the most values: the slowest token searches
        """SELECT t.norm FROM value_tokens v JOIN tokens t ON t.token_id = v.token_id WHERE v.side = 1
        GROUP BY t.norm ORDER BY COUNT(*) DESC LIMIT 5"""
    ).fetchall()
    conn.close()
    return {
        "memory": [{"layer": rng.choice(layers), "key": rng.randrange(d_mlp)} for _ in range(n)],
        "search_token": [{"q": w} for w in words[:n]],
        "search_token_leading_space": [{"q": " " + w} for w in words[n : 2 * n]],
        "search_token_common": [{"q": r[0]} for r in common],
        "search_token_words": [{"q": f"{toks[0].strip()} {toks[1].strip()}"} for toks in tops[:n]],
        "search_text_phrase": [{"q": p} for p in phrases],
        "search_text_common_word": [{"q": w} for w in ("the", "of", "and", "in", "a")],
        "layers": [{}] * n,
    }


ROUTE = {
    "memory": "/api/memory",
    "search_token": "/api/search/token",
    "search_token_leading_space": "/api/search/token",
    "search_token_common": "/api/search/token",
    "search_token_words": "/api/search/token",
    "search_text_phrase": "/api/search/text",
    "search_text_common_word": "/api/search/text",
    "layers": "/api/layers",
}


def measure(get: Callable[[str], bytes], plans: dict[str, list[dict]], warmup: int) -> dict:
    out = {}
    for name, args in plans.items():
        urls = [ROUTE[name] + ("?" + urllib.parse.urlencode(a) if a else "") for a in args]
        for url in urls[:warmup]:
            get(url)
        times, sizes = [], []
        for url in urls:
            start = time.perf_counter()
            sizes.append(len(get(url)))
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        out[name] = {
            "n": len(times),
            "median_ms": round(statistics.median(times), 2),
            "p90_ms": round(times[int(0.9 * (len(times) - 1))], 2),
            "max_ms": round(times[-1], 2),
            "median_response_kb": round(statistics.median(sizes) / 1024, 1),
        }
        print(f"{name:<28} median {out[name]['median_ms']:8.2f} ms   max {out[name]['max_ms']:8.2f} ms")
    return out


def screenshot(server: BrowserServer, index_path: Path, path: Path, chromium: str) -> str:
    from playwright.sync_api import sync_playwright

    with BrowserIndex(index_path) as index:  # a memory whose top token is its triggers' next token
        row = (
            index.conn.execute(
                "SELECT layer, key, top_tokens FROM memories WHERE agrees = 1 ORDER BY precision_at_k DESC, id LIMIT 1"
            ).fetchone()
            or index.conn.execute("SELECT layer, key, top_tokens FROM memories LIMIT 1").fetchone()
        )
    token = json.loads(row["top_tokens"])[0] if row["top_tokens"] else ""
    fragment = urllib.parse.urlencode({"layer": row["layer"], "key": row["key"], "q": token, "mode": "token"})
    path.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1050}, device_scale_factor=1)
        page.goto(f"{server.url}#{fragment}")
        page.wait_for_selector("#examples-top tr.example")
        page.wait_for_function("document.body.dataset.pending === '0'")
        page.screenshot(path=str(path))
        browser.close()
    return f"#{fragment}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    from ffkv_lens.analysis.atlas import TriggerAtlas

    build = time_build(args.run_dir)
    print(f"build: {build['seconds']} s, {build['size_mb']} MB, {build['n_examples']:,} examples")
    print("tables (MB): " + ", ".join(f"{name} {mb}" for name, mb in list(build["tables_mb"].items())[:6]))
    index_path = args.run_dir / "browser.sqlite"
    atlas = TriggerAtlas.load(args.run_dir / "atlas")
    baseline = time_baseline(atlas, args.baseline_memories, build["n_examples"], rng)
    print(f"baseline (one-by-one decode) extrapolated: {baseline['extrapolated_seconds']} s")
    parity = check_parity(index_path, atlas, args.parity_memories, rng)
    print(f"parity: {parity['mismatches']} mismatches in {parity['examples']} examples")
    server = BrowserServer(index_path, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        get = lambda url: urllib.request.urlopen(server.url.rstrip("/") + url, timeout=60).read()  # noqa: E731
        queries = measure(get, query_plans(index_path, args.repeats, rng), args.warmup)
        shot = screenshot(server, index_path, args.screenshot, args.chromium) if args.screenshot else None
    finally:
        server.shutdown()
        server.server_close()
    result = {
        "run_dir": str(args.run_dir),
        "build": build,
        "baseline_decode_one_by_one": baseline,
        "parity": parity,
        "queries": queries,
        "screenshot": {"path": str(args.screenshot), "fragment": shot} if shot else None,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
        },
        "settings": {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
