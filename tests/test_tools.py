"""The repository checks in tools/: the import-graph check and the skipped-in-both check, on made-up inputs."""

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_imports = _tool("check_imports")
check_skips = _tool("check_skips")


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in {"__init__.py": '_LAZY = {"MemoryLens": "ffkv_lens.lens"}\n', **files}.items():
        path = root / "ffkv_lens" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_import_check_passes_a_downward_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _package(
        tmp_path,
        {
            "errors.py": "",
            "analysis/__init__.py": "",
            "analysis/atlas.py": "from ffkv_lens.errors import X\nfrom ffkv_lens.adapters.base import MemoryAdapter\n",
            "adapters/__init__.py": "",
            "adapters/base.py": "import ffkv_lens.errors\n",
            "lens.py": "from ffkv_lens.analysis import atlas\n",
            "cli.py": "def main():\n    from ffkv_lens import MemoryLens\n",
        },
    )
    assert check_imports.main(["--root", str(root)]) == 0
    assert "import graph ok" in capsys.readouterr().out


def test_import_check_reports_lazy_upward_imports_cycles_and_the_top_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _package(
        tmp_path,
        {
            "lens.py": "",
            "analysis/__init__.py": "",
            "analysis/a.py": "def f():\n    from ffkv_lens import MemoryLens\n",  # lazy, through the top package
            "analysis/b.py": "from ffkv_lens.adapters.bridge import BridgeAdapter\n",  # past the interface
            "adapters/__init__.py": "",
            "adapters/bridge.py": "",
            "browser/__init__.py": "",
            "browser/build.py": "from ffkv_lens.browser.index import normalize\n",
            "browser/index.py": "def fill():\n    from ffkv_lens.browser import build\n",
            "comparison/__init__.py": "",
            "comparison/folder.py": "from ffkv_lens.pipeline import write_table\n",
            "pipeline.py": "",
        },
    )
    assert check_imports.main(["--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "import cycle: ffkv_lens.browser.build <-> ffkv_lens.browser.index" in out, out
    assert "ffkv_lens/analysis/a.py:2: ffkv_lens.analysis.a imports ffkv_lens.lens: upward" in out, out
    assert "ffkv_lens/analysis/a.py:2:" in out and "must not import the top package" in out, out
    assert "ffkv_lens/analysis/b.py:1:" in out and "adapters only through" in out, out
    assert "comparison.folder imports ffkv_lens.pipeline: sideways" in out, out
    assert "5 import violation(s)" in out, out


def test_every_unit_of_the_package_has_a_layer() -> None:
    """Every unit of the real package has a layer (a new top-level module must be added to LAYERS)."""
    root = Path(__file__).resolve().parents[1]
    _, edges = check_imports.collect_edges(root)
    assert not [line for line in check_imports.layer_violations(edges) if "has no layer" in line]


def _record(path: Path, skipped: dict[str, str], ran: list[str]) -> Path:
    path.write_text(json.dumps({"skipped": skipped, "ran": ran}))
    return path


def test_skip_check_fails_only_for_tests_that_run_nowhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = _record(
        tmp_path / "main.json",
        {
            "tests/a/test_hooked.py": "needs transformer-lens 3.x",  # module skipped, runs in TL3: fine
            "tests/a/test_v.py::test_tl3[raw]": "needs TransformerLens 3.x",  # not collected in TL3
            "tests/k/test_topk.py::test_fused_cuda": "needs CUDA",  # allowed reason
            "tests/b/test_browser.py": "no chromium binary",  # allowed reason
        },
        ["tests/a/test_v.py::test_other", "tests/a/test_cross.py::test_x[gpt2]"],
    )
    tl3 = _record(
        tmp_path / "tl3.json",
        {"tests/a/test_cross.py": "compares with transformer-lens 3.x from a 4.x environment"},  # ran in main
        ["tests/a/test_hooked.py::test_one[gpt2]"],
    )
    assert check_skips.main([str(main), str(tl3), "--allow", "cuda|gpu|chromium|playwright"]) == 1
    out = capsys.readouterr().out
    assert re.findall(r"runs in neither environment: (\S+)", out) == ["tests/a/test_v.py::test_tl3[raw]"], out
    assert check_skips.main([str(main), str(tl3), "--allow", "cuda|chromium|transformerlens 3"]) == 0
