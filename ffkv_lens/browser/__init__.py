"""The memory browser: SQLite indexes of run and comparison folders and a local web page to explore them.

- :mod:`ffkv_lens.browser.index`: build/rebuild ``RUN_DIR/browser.sqlite`` (fingerprint, atomic).
- :mod:`ffkv_lens.browser.queries`: read-only queries (the JSON API's answers, the search rules).
- :mod:`ffkv_lens.browser.matches`: a comparison folder and its matches index ``CMP_DIR/browser.sqlite``.
- :mod:`ffkv_lens.browser.catalog`: the runs and comparisons one browser serves, each run labelled.
- :mod:`ffkv_lens.browser.server`: the stdlib web server on a loopback address.
- :mod:`ffkv_lens.browser.prompt`: the Prompt page's model (trace and generate under memory edits).

Example:
    >>> from ffkv_lens.browser import BrowserServer, open_catalog, open_index  # doctest: +SKIP
    >>> server = BrowserServer(open_index("runs/smollm2", progress=True), port=0)  # doctest: +SKIP
    >>> server = BrowserServer(open_catalog(["runs/cmp"], progress=True), port=0)  # doctest: +SKIP
    >>> print(server.url); server.serve_forever()  # doctest: +SKIP

Command line: ``ffkv-lens browse PATH [PATH ...] [--port P] [--model [NAME_OR_PATH]]`` (docs/browser.md).
"""

from ffkv_lens.browser.catalog import Catalog, open_catalog
from ffkv_lens.browser.index import normalize_token, open_index
from ffkv_lens.browser.queries import BrowserIndex
from ffkv_lens.browser.server import BrowserServer

__all__ = ["BrowserIndex", "BrowserServer", "Catalog", "normalize_token", "open_catalog", "open_index"]
