"""A pytest plugin that records which tests skipped and why, for ``tools/check_skips.py``.

Loaded with ``-p tests.skip_record``; writes nothing unless ``FFKV_SKIP_RECORD`` names a JSON file.
The file holds ``{"skipped": {nodeid: reason}, "ran": [nodeid, ...]}``: a module skipped at
collection (``allow_module_level=True``) is recorded under its file's node id.
"""

import json
import os
from pathlib import Path

import pytest

ENV_VAR = "FFKV_SKIP_RECORD"

_skipped: dict[str, str] = {}
_ran: set[str] = set()


def _reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _skipped[report.nodeid] = _reason(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped[report.nodeid] = _reason(report)
    elif report.when == "call":
        _ran.add(report.nodeid)


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = os.environ.get(ENV_VAR)
    if not target:
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"skipped": dict(sorted(_skipped.items())), "ran": sorted(_ran - set(_skipped))}
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
