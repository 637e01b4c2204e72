"""The memory browser's local web server: one self-contained page and a small JSON API.

Standard library only (``http.server.ThreadingHTTPServer``): the API is a few GET routes over
read-only SQLite, so a web framework would add a dependency and nothing else. The server binds to
a loopback address only (it has no authentication) and answers only requests whose ``Host``
header names it, which stops DNS-rebinding pages from reading the API.

It serves a :class:`~ffkv_lens.browser.catalog.Catalog`: one run, or several runs and the
comparisons that match their memories. Routes (all GET, and HEAD: the same status and headers, no
body; bad parameters, an unknown ``run`` among them, give HTTP 400 with ``{"error": "..."}``);
``run=LABEL`` picks the run (default: the first). Integer parameters are ASCII ``-?[0-9]+`` only.
Non-finite numbers (NaN, infinity) in an answer are JSON ``null``. A connection that sends nothing
for :data:`REQUEST_TIMEOUT` seconds is closed, so a half-sent request cannot hold a thread:

- ``/``: the page (inline JS and CSS, no external resources).
- ``/api/runs``: the runs (label, model, layers, d_mlp, k) and comparisons served; the default run.
- ``/api/info[?run=R]``: model, layers, d_mlp, k, what the run folder holds.
- ``/api/layers[?run=R]``: per-layer summary.
- ``/api/memory?layer=L&key=K[&run=R]``: one memory (examples, value tokens, scores, neighbours, statistics).
- ``/api/memories?layer=L[&sort=density|mean|std|count|key][&order=desc|asc][&min_density=X][&max_density=Y]
  [&limit=N][&run=R]``: a layer's memories sorted and filtered by their statistics.
- ``/api/memory/tokens?layer=L&key=K[&run=R]``: with a model only, the memory's coefficient at every token of
  its quantile samples, recomputed (:mod:`ffkv_lens.browser.token_coefficients`); 400 without a model.
- ``/api/matches?layer=L&key=K[&run=R]``: the memory's matches in the other runs (comparisons).
- ``/api/search/token?q=TOKEN[&sign=1|-1][&limit=N][&run=R]``: memories whose value promotes the token.
- ``/api/search/text?q=TEXT[&limit=N][&run=R]``: memories whose trigger examples contain the text.

With a model (``prompt``, a :class:`~ffkv_lens.browser.prompt.PromptModel`), the Prompt page's two POST
routes ``/api/prompt/trace`` and ``/api/prompt/generate`` take a JSON object (``Content-Type:
application/json``, at most :data:`MAX_BODY` bytes: else 415 or 413) and answer as
:mod:`ffkv_lens.browser.prompt` says; a request past a bound is a 400. Without a model they answer 404
saying so; ``/api/runs`` names the model (``prompt``) or gives ``null``. A POST whose ``Origin`` is
not this server is refused (403), as is a cross-site form.

Example:
    >>> server = BrowserServer("runs/smollm2/browser.sqlite", port=0)  # doctest: +SKIP
    >>> server = BrowserServer(open_catalog(["runs/cmp"]), port=0)  # doctest: +SKIP
    >>> print(server.url); server.serve_forever()  # doctest: +SKIP
"""

import errno
import ipaddress
import json
import logging
import math
import re
import socket
import sqlite3
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ffkv_lens.browser.catalog import Catalog
from ffkv_lens.browser.prompt import PROMPT_ROUTES, PromptModel
from ffkv_lens.browser.queries import DEFAULT_LIMIT, BrowserIndex
from ffkv_lens.browser.token_coefficients import sample_token_coefficients
from ffkv_lens.errors import ConfigError

__all__ = ["MAX_BODY", "REQUEST_TIMEOUT", "BrowserServer"]

log = logging.getLogger(__name__)
REQUEST_TIMEOUT = 30.0  # seconds a connection may stay silent (mid-request too) before it is closed
MAX_BODY = 64 * 1024  # bytes of a POST body (a prompt of max_prompt_tokens and its edits fit many times)
_INTEGER = re.compile(r"-?[0-9]+")
_PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class BrowserServer(ThreadingHTTPServer):
    """Serve a run's index, or a catalog of runs and comparisons, on a loopback address.

    Args:
        source: A built index (:func:`ffkv_lens.browser.open_index`) or a catalog
            (:func:`ffkv_lens.browser.open_catalog`).
        host: A loopback address or ``localhost``.
        port: TCP port (0: any free one).
        request_timeout: Seconds a connection may stay silent before it is closed (socket timeout).
        prompt: The model of the Prompt page (:class:`~ffkv_lens.browser.prompt.PromptModel`), or
            ``None``: the page and its API then say the server was started without a model.

    Raises:
        ConfigError: The host is not a loopback address, the port is in use or out of range, or the
            timeout is not positive.
    """

    daemon_threads = True

    def __init__(
        self,
        source: str | Path | Catalog,
        host: str = "127.0.0.1",
        port: int = 0,
        request_timeout: float = REQUEST_TIMEOUT,
        prompt: PromptModel | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"port={port!r} is not a TCP port; pass 0 (any free port) to 65535.")
        if not (isinstance(request_timeout, int | float) and math.isfinite(request_timeout) and request_timeout > 0):
            raise ConfigError(f"request_timeout={request_timeout!r}; pass a positive number of seconds.")
        self.request_timeout = float(request_timeout)
        self.prompt = prompt
        # Opening every index here fails early on a damaged one.
        self.catalog = source if isinstance(source, Catalog) else Catalog.from_index(source)
        self.page = resources.files("ffkv_lens.browser").joinpath("page.html").read_bytes()
        self.address_family = socket.AF_INET6 if ":" in _check_loopback(host) else socket.AF_INET
        try:
            super().__init__((host, port), _Handler)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {port} on {host} is in use; pass --port 0 to pick a free port, or another --port."
                ) from None
            raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --host/--port.") from None
        self.host, self.port = host, self.server_address[1]

    @property
    def url(self) -> str:
        """The page's address."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a failed connection (socketserver's default prints a traceback to stderr)."""
        log.debug("connection from %s failed", client_address, exc_info=True)

    def allowed_hosts(self) -> set[str]:
        """``Host`` header values this server answers."""
        names = {self.host, "localhost", "127.0.0.1", "[::1]", f"[{self.host}]"}
        return {f"{name}:{self.port}" for name in names}


def _check_loopback(host: str) -> str:
    if host == "localhost":
        return host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"host={host!r} is not a loopback address; the browser has no authentication, so it listens on "
            "127.0.0.1 (or ::1, localhost) only. From another machine use an SSH tunnel: ssh -L 8000:127.0.0.1:8000."
        )
    return host


def _int(params: dict[str, str], name: str, default: int | None = None) -> int:
    if name not in params:
        if default is None:
            raise ConfigError(f"{name} is missing; pass {name}=<integer>.")
        return default
    text = params[name]
    if _INTEGER.fullmatch(text):
        try:
            return int(text)
        except ValueError:  # more digits than int() takes
            pass
    raise ConfigError(f"{name}={text!r} is not an integer; pass ASCII digits with an optional '-', e.g. {name}=3.")


def _memory(index: BrowserIndex, p: dict[str, str]) -> Any:
    return index.memory(_int(p, "layer"), _int(p, "key"))


def _float(params: dict[str, str], name: str) -> float | None:
    if name not in params or params[name] == "":
        return None
    try:
        value = float(params[name])
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"{name}={params[name]!r} is not a finite number; pass e.g. {name}=0.05.")
    return value


def _memories(index: BrowserIndex, p: dict[str, str]) -> Any:
    return index.memories(
        _int(p, "layer"), sort=p.get("sort", "density"), order=p.get("order", "desc"),
        min_density=_float(p, "min_density"), max_density=_float(p, "max_density"),
        limit=_int(p, "limit", DEFAULT_LIMIT),
    )  # fmt: skip


def _token(index: BrowserIndex, p: dict[str, str]) -> Any:
    return index.search_token(p.get("q", ""), sign=_int(p, "sign", 1), limit=_int(p, "limit", DEFAULT_LIMIT))


def _text(index: BrowserIndex, p: dict[str, str]) -> Any:
    return index.search_text(p.get("q", ""), limit=_int(p, "limit", DEFAULT_LIMIT))


def _matches(catalog: Catalog, p: dict[str, str]) -> Any:
    return catalog.matches(p.get("run"), _int(p, "layer"), _int(p, "key"))


# Routes over one run's index: path -> (allowed parameters besides run, handler).
_RUN_ROUTES: dict[str, tuple[tuple[str, ...], Callable[[BrowserIndex, dict[str, str]], Any]]] = {
    "/api/info": ((), lambda index, p: index.info()),
    "/api/layers": ((), lambda index, p: {"layers": index.layer_summary()}),
    "/api/memory": (("layer", "key"), _memory),
    "/api/memories": (("layer", "sort", "order", "min_density", "max_density", "limit"), _memories),
    "/api/search/token": (("q", "sign", "limit"), _token),
    "/api/search/text": (("q", "limit"), _text),
}
# Routes over one run's index and the model: path -> (allowed parameters besides run, handler).
_MODEL_ROUTES: dict[str, tuple[tuple[str, ...], Callable[[Any, str, BrowserIndex, dict[str, str]], Any]]] = {
    "/api/memory/tokens": (
        ("layer", "key"),
        lambda prompt, run, index, p: sample_token_coefficients(prompt, run, index, _int(p, "layer"), _int(p, "key")),
    ),
}
# Routes over the whole catalog: path -> (allowed parameters, handler).
_CATALOG_ROUTES: dict[str, tuple[tuple[str, ...], Callable[[Catalog, dict[str, str]], Any]]] = {
    "/api/runs": ((), lambda catalog, p: catalog.describe()),  # + "prompt" (_Handler._api)
    "/api/matches": (("run", "layer", "key"), _matches),
}


class _Handler(BaseHTTPRequestHandler):
    server: BrowserServer
    server_version = "ffkv-lens-browser"
    head_only = False

    def setup(self) -> None:
        # StreamRequestHandler applies self.timeout to the socket; reads past it end the connection.
        self.timeout = self.server.request_timeout
        super().setup()

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's name)
        self.head_only = True
        try:
            self.do_GET()
        finally:
            self.head_only = False

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        host = self.headers.get("Host")
        if host is not None and host not in self.server.allowed_hosts():
            self._json(403, {"error": f"Host {host!r} is not this server; open {self.server.url}."})
        elif url.path in ("/", "/index.html"):
            self._send(200, self.server.page, "text/html; charset=utf-8", {"Content-Security-Policy": _PAGE_CSP})
        elif url.path in _RUN_ROUTES or url.path in _CATALOG_ROUTES or url.path in _MODEL_ROUTES:
            self._api(url.path, url.query)
        elif url.path in PROMPT_ROUTES:
            self._json(405, {"error": f"{url.path} takes a POST with a JSON body (see docs/browser.md)."})
        else:
            self._json(404, {"error": f"no such page {url.path!r}; the API is under /api/ (see docs/browser.md)."})

    def _api(self, path: str, query: str) -> None:
        catalog = self.server.catalog
        try:
            if path in _CATALOG_ROUTES:
                allowed, on_catalog = _CATALOG_ROUTES[path]
                body = on_catalog(catalog, _params(query, allowed))
                if path == "/api/runs":
                    body["prompt"] = None if self.server.prompt is None else self.server.prompt.info()
            elif path in _MODEL_ROUTES:
                body = self._model_api(path, query)
            else:
                allowed, on_index = _RUN_ROUTES[path]
                params = _params(query, (*allowed, "run"))
                with catalog.open(params.pop("run", None)) as index:
                    body = on_index(index, params)
        except ConfigError as err:
            self._json(400, {"error": str(err)})
        except sqlite3.Error as err:
            log.exception("query %s?%s failed", path, query)
            self._json(500, {"error": f"the index could not answer ({err}); rebuild it with `ffkv-lens browse`."})
        else:
            self._json(200, body)

    def _model_api(self, path: str, query: str) -> Any:
        """A GET route over one run's index that also needs the model (``browse --model``)."""
        allowed, on_model = _MODEL_ROUTES[path]
        params = _params(query, (*allowed, "run"))
        label = params.pop("run", None)
        with self.server.catalog.open(label) as index:
            return on_model(self.server.prompt, label or self.server.catalog.default, index, params)

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        path, prompt = urlsplit(self.path).path, self.server.prompt
        refused = self._refuse_post(path)
        if refused is not None:
            self._json(*refused)
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            self._json(400, {"error": f"the request body is not JSON ({err})."})
            return
        try:
            answer = PROMPT_ROUTES[path](prompt, body)
        except ConfigError as err:
            self._json(400, {"error": str(err)})
        except Exception as err:  # a model failure must not kill the server; the page shows it
            log.exception("POST %s failed", path)
            self._json(500, {"error": f"the model failed ({type(err).__name__}: {err})."})
        else:
            self._json(200, answer)

    def _refuse_post(self, path: str) -> tuple[int, dict[str, str]] | None:
        """``(status, body)`` when a POST is refused before its body is read, else ``None``."""
        host, origin = self.headers.get("Host"), self.headers.get("Origin")
        length = self.headers.get("Content-Length", "")
        if host is not None and host not in self.server.allowed_hosts():
            return 403, {"error": f"Host {host!r} is not this server; open {self.server.url}."}
        if origin is not None and origin.removeprefix("http://") not in self.server.allowed_hosts():
            return 403, {"error": f"Origin {origin!r} is not this server; POST from {self.server.url}."}
        if path not in PROMPT_ROUTES:
            return 404, {"error": f"no POST route {path!r}; the Prompt API is {sorted(PROMPT_ROUTES)}."}
        if self.server.prompt is None:
            return 404, {
                "error": "this browser was started without a model, so the Prompt page is off; restart it with "
                "`ffkv-lens browse RUN_DIR --model` (the run's model) or `--model NAME_OR_PATH`."
            }
        if self.headers.get_content_type() != "application/json":
            return 415, {"error": f"Content-Type {self.headers.get_content_type()!r}; send application/json."}
        if not (length.isascii() and length.isdigit()):
            return 411, {"error": f"Content-Length {length!r}; send the body's length in bytes."}
        if int(length) > MAX_BODY:
            return 413, {"error": f"the request body is {int(length)} bytes; the limit is {MAX_BODY} bytes (MAX_BODY)."}
        return None

    def _json(self, status: int, body: Any) -> None:
        try:
            text = json.dumps(body, ensure_ascii=False, allow_nan=False)
        except ValueError:  # a NaN or infinity somewhere: JSON has none, so they become null
            text = json.dumps(_finite(body), ensure_ascii=False, allow_nan=False)
        self._send(status, text.encode("utf-8"), "application/json; charset=utf-8")

    def _send(self, status: int, data: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": content_type, "Content-Length": str(len(data)), "Cache-Control": "no-store"}
        headers.update({"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", **(extra or {})})
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not self.head_only:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s %s", self.address_string(), format % args)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (in dicts, lists and tuples) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _params(query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    try:
        parsed = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query), errors="strict")
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"the query string {query!r} is malformed ({err}).") from None
    unknown = sorted(set(parsed) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown parameters {unknown}; this route takes {list(allowed) or 'none'}.")
    repeated = sorted(name for name, values in parsed.items() if len(values) > 1)
    if repeated:
        raise ConfigError(f"parameters {repeated} are given more than once; give each once.")
    return {name: values[0] for name, values in parsed.items()}
