"""Wall time of one live-browser "edit + re-run": an HTTP POST to ``/api/prompt/trace`` of the real server.

The server is the one ``ffkv-lens browse RUN_DIR --model`` starts (the run's own model, loaded once),
serving in a thread of this process on 127.0.0.1; the client is ``http.client`` on a fresh
connection per request, as the page's ``fetch`` is. After a warm-up (the base trace of the prompt
is cached by the server, the weight-only factors by the trace), each of ``--repeats`` rounds posts
a different single-memory ablation, as a user clicking memories would, and reads the whole JSON
answer. Baseline in the same run, alternating with the requests: the in-process
``lens.trace(tokens, edits=...).to_dict()`` that the request wraps. Reports median, min and max seconds.

Usage:
    python benchmarks/prompt_roundtrip.py RUN_DIR --out prompt_roundtrip.json [--threads 1]
"""

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from ffkv_lens import Edit  # noqa: E402
from ffkv_lens.browser import BrowserServer, open_catalog  # noqa: E402
from ffkv_lens.browser.prompt import PromptModel  # noqa: E402

TEXT = "The capital of France is a city called Paris and"  # 10 tokens (+ BOS) on SmolLM2


def _post(port: int, body: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/api/prompt/trace", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {answer}")
        return answer
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (its index is built there if missing)")
    parser.add_argument("--model", default=None, help="default: the run's own model (manifest config.model)")
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    catalog = open_catalog([args.run_dir])
    model = args.model or json.loads((args.run_dir / "manifest.json").read_text())["config"]["model"]
    prompt = PromptModel.load(model, device="cpu", run=catalog.default)
    server = BrowserServer(catalog, port=0, prompt=prompt)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = _post(server.port, {"text": args.text})  # warm-up: fills the server's base-trace cache
        targets = [(m["layer"], m["key"]) for m in base["base"]["memories"]][: args.repeats + 1]
        edits = [{"layer": layer, "keys": [key], "op": "zero"} for layer, key in targets]
        _post(server.port, {"text": args.text, "edits": edits[0:1]})
        tokens = prompt.lens.adapter.to_tokens(args.text)
        http_s, trace_s = [], []
        for edit in edits[1:]:
            start = time.perf_counter()
            answer = _post(server.port, {"text": args.text, "edits": [edit]})
            http_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            prompt.lens.trace(tokens, top=prompt.limits.default_top, edits=[Edit.from_dict(edit)]).to_dict()
            trace_s.append(time.perf_counter() - start)
    finally:
        server.shutdown()
        server.server_close()
    stats = lambda xs: {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}  # noqa: E731
    result = {
        "model": model,
        "prompt_tokens": answer["n_tokens"],
        "repeats": len(http_s),
        "threads": torch.get_num_threads(),
        "http_edit_and_rerun_s": stats(http_s),
        "in_process_trace_s": stats(trace_s),
        "load_average": os.getloadavg(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
