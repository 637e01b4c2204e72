"""The memory browser: a SQLite index of a run folder and a local web page to explore it.

- :mod:`ffkv_lens.browser.index`: build/rebuild ``RUN_DIR/browser.sqlite`` (fingerprint, atomic).
- :mod:`ffkv_lens.browser.queries`: read-only queries (the JSON API's answers, the search rules).
- :mod:`ffkv_lens.browser.server`: the stdlib web server on a loopback address.

Example:
    >>> from ffkv_lens.browser import BrowserServer, open_index  # doctest: +SKIP
    >>> server = BrowserServer(open_index("runs/smollm2", progress=True), port=0)  # doctest: +SKIP
    >>> print(server.url); server.serve_forever()  # doctest: +SKIP

Command line: ``ffkv-lens browse RUN_DIR [--port P]`` (docs/browser.md).
"""

from ffkv_lens.browser.index import normalize_token, open_index
from ffkv_lens.browser.queries import BrowserIndex
from ffkv_lens.browser.server import BrowserServer

__all__ = ["BrowserIndex", "BrowserServer", "normalize_token", "open_index"]
