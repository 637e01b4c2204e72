"""Every subcommand that reads a folder turns a damaged run folder into one line on stderr and exit code 2.

Each case damages one copy of a real tiny run folder (truncated safetensors, a manifest that is a
list or holds a string where a number belongs, a garbled CSV table, a missing file); `report`,
`show`, `browse` (whose index build fails before serving) and `compare --no-match` must print one
``ffkv-lens: error:`` line naming the file, exit 2, and never print a traceback.
"""

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ffkv_lens.cli import REPORT_BUG, main
from tests.report.runs import build_tiny_run


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        path = run / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return damage


def _edit_json(name: str, edit: Callable[[object], object]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        path = run / name
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    return damage


def _set(keys: tuple[str, ...], value: object) -> Callable[[object], object]:
    def edit(manifest: object) -> object:
        node = manifest
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
        return manifest

    return edit


def _garble_tables(run: Path) -> None:
    for name in ("agreement_per_memory", "agreement_per_layer", "mutation_per_key"):
        path = run / "tables" / f"{name}.csv"
        lines = path.read_text().splitlines()
        path.write_text("\n".join([lines[0], '1,2,"unclosed', *lines[1:3], "x,y,z,1,2,3,4,5,6,7,8,9,10,11,12"]) + "\n")


def _remove(name: str) -> Callable[[Path], None]:
    return lambda run: (run / name).unlink()


def _to_list(_: object) -> object:
    return [1, 2, 3]


# (case id, damage, the file the error must name, whether `compare --no-match` reads that file)
CASES = [
    ("atlas-truncated", _truncate("atlas/atlas.safetensors"), "atlas.safetensors", False),
    ("units-truncated", _truncate("atlas/units.safetensors"), "units.safetensors", False),
    ("values-truncated", _truncate("values/projection.safetensors"), "projection.safetensors", False),
    ("manifest-list", _edit_json("manifest.json", _to_list), "manifest.json", True),
    ("atlas-manifest-list", _edit_json("atlas/manifest.json", _to_list), "atlas/manifest.json", False),
    ("values-manifest-list", _edit_json("values/manifest.json", _to_list), "values/manifest.json", False),
    ("layers-string", _edit_json("manifest.json", _set(("layout", "n_layers"), "three")), "manifest.json", True),
    ("k-string", _edit_json("atlas/manifest.json", _set(("settings", "k"), "4")), "atlas/manifest.json", False),
    ("top-k-string", _edit_json("values/manifest.json", _set(("settings", "top_k"), "ten")), "values/manifest", False),
    ("tables-garbled", _garble_tables, ".csv", True),
    ("tables-garbled-no-figures", lambda run: (_garble_tables(run), shutil.rmtree(run / "figures")), ".csv", False),
    ("units-missing", _remove("atlas/units.safetensors"), "units.safetensors", False),
    ("values-missing", _remove("values/projection.safetensors"), "projection.safetensors", False),
]


@pytest.fixture(scope="module")
def run_dir(tiny_folder, tmp_path_factory) -> Path:
    return build_tiny_run(tiny_folder("gpt2"), tmp_path_factory.mktemp("damaged-run"))


@pytest.fixture(scope="module")
def damaged(run_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("damaged")
    folders = {}
    for name, damage, _, _ in CASES:
        folder = root / name
        shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("browser.sqlite*", "search"))
        damage(folder)
        folders[name] = folder
    return folders


def _commands(folder: Path, run_dir: Path, out: Path) -> dict[str, list[str]]:
    return {
        "report": ["report", str(folder)],
        "show": ["show", str(folder), "--layer", "1", "--key", "3"],
        "browse": ["browse", str(folder), "--port", "0", "--no-open"],
        "compare": ["compare", str(run_dir), str(folder), "--no-match", "--out", str(out)],
    }


def _check_one_line(captured: Any, expected: str) -> None:
    text = captured.out + captured.err
    assert "Traceback" not in text and REPORT_BUG not in text, text
    # `browse` draws progress bars (carriage returns) on stderr while it builds the index; the rest is one line.
    lines = [line for line in captured.err.split("\n") if line and "\r" not in line]
    assert len(lines) == 1 and lines[0].startswith("ffkv-lens: error: ") and captured.err.endswith("\n"), captured.err
    assert expected in lines[0], captured.err


@pytest.mark.parametrize("command", ["report", "show", "browse"])
@pytest.mark.parametrize(("case", "expected"), [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_damaged_run_folder_is_one_line_exit_2(damaged, run_dir, tmp_path, capsys, case, expected, command) -> None:
    argv = _commands(damaged[case], run_dir, tmp_path / "cmp")[command]
    assert main(argv) == 2
    _check_one_line(capsys.readouterr(), expected)
    assert not (damaged[case] / "browser.sqlite").exists()  # no half-built index left behind


@pytest.mark.parametrize(("case", "expected"), [(c[0], c[2]) for c in CASES if c[3]], ids=[c[0] for c in CASES if c[3]])
def test_compare_on_a_damaged_run_is_one_line_exit_2(damaged, run_dir, tmp_path, capsys, case, expected) -> None:
    assert main(_commands(damaged[case], run_dir, tmp_path / "cmp")["compare"]) == 2
    _check_one_line(capsys.readouterr(), expected)


def test_a_bug_prints_the_traceback_and_asks_for_a_report(run_dir, monkeypatch, capsys) -> None:
    import ffkv_lens.report as report

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(report, "write_report", broken)
    assert main(["report", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err and err.rstrip().endswith(REPORT_BUG)


def test_ctrl_c_exits_130_with_one_line(run_dir, monkeypatch, capsys) -> None:
    import ffkv_lens.report as report

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", interrupted)
    assert main(["report", str(run_dir)]) == 130
    assert capsys.readouterr().err == "ffkv-lens: interrupted\n"
