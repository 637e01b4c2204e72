"""Fail when a test runs in neither environment: skipped in the main venv and skipped in or absent from the TL3 one.

``make test`` runs the main suite in ``.venv`` and ``TL3_TESTS`` in ``.venv-tl3``, each with the
plugin ``tests/skip_record.py``, which writes ``{"skipped": {nodeid: reason}, "ran": [...]}``.
A test (or a module skipped at collection) counts as covered when some test under its node id
ran in the other environment. A test the TL3 run did not collect counts as skipped there.
Skips whose reason matches ``--allow`` (a missing GPU or browser, by default) are accepted.

Usage: ``python tools/check_skips.py build/skips/main.json build/skips/tl3.json [--allow REGEX]``.
"""

import argparse
import json
import re
import sys
from pathlib import Path

DEFAULT_ALLOW = r"cuda|gpu|chromium|playwright"


def load(path: Path) -> tuple[dict[str, str], list[str]]:
    """The skipped tests (node id -> reason) and the tests that ran, of one record."""
    record = json.loads(path.read_text(encoding="utf-8"))
    return dict(record["skipped"]), list(record["ran"])


def _covers(ran_id: str, node_id: str) -> bool:
    """Whether ``ran_id`` (a test that ran) is ``node_id`` or lies under it (a module or class)."""
    return ran_id == node_id or ran_id.startswith(node_id + "::")


def _ran_anywhere(node_id: str, ran: list[str]) -> bool:
    return any(_covers(ran_id, node_id) for ran_id in ran)


def skipped_in_both(
    first: tuple[dict[str, str], list[str]], second: tuple[dict[str, str], list[str]], allow: re.Pattern[str]
) -> dict[str, str]:
    """Node ids skipped in ``first`` (for a reason ``allow`` does not match) that did not run in ``second``."""
    skipped, _ = first
    _, ran_there = second
    return {
        node_id: reason
        for node_id, reason in sorted(skipped.items())
        if not allow.search(reason) and not _ran_anywhere(node_id, ran_there)
    }


def main(argv: list[str] | None = None) -> int:
    """Print each test that runs in neither environment; 1 when there is one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("main_record", type=Path, help="skip record of the main venv's run")
    parser.add_argument("tl3_record", type=Path, help="skip record of the TL3 venv's run (TL3_TESTS only)")
    parser.add_argument("--allow", default=DEFAULT_ALLOW, help=f"regex of accepted skip reasons ({DEFAULT_ALLOW})")
    args = parser.parse_args(argv)
    allow = re.compile(args.allow, re.IGNORECASE)
    main_run, tl3_run = load(args.main_record), load(args.tl3_record)
    found = skipped_in_both(main_run, tl3_run, allow)
    for node_id, reason in skipped_in_both(tl3_run, main_run, allow).items():
        found.setdefault(node_id, reason)
    for node_id, reason in found.items():
        print(f"runs in neither environment: {node_id} (skipped: {reason})")
    if found:
        print(
            f"{len(found)} test(s) skipped in both .venv and .venv-tl3 for a reason other than /{args.allow}/: "
            "make them run in one environment (add their file to TL3_TESTS in the Makefile) or fix the skip."
        )
        return 1
    print(f"skips ok: every skipped test runs in the other environment or needs /{args.allow}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
