"""A hostile run folder: markup in every manifest and table string, out-of-range ids in the atlas.

The report must escape all of it (no ``<script`` from the data reaches report.html), and `show`
and the browser index build must refuse the tampered atlas with one line, or render safely.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ffkv_lens.browser import open_index
from ffkv_lens.cli import main
from ffkv_lens.errors import DamagedFileError
from ffkv_lens.report import RunFolder, write_report
from tests.report.runs import build_tiny_run, copy_run

EVIL = "<script>alert(1)</script><img src=x onerror=alert(2)>\"'&"


def _poison(value: object) -> object:
    """Every string (keys stay) replaced by markup; numbers, booleans and lists of numbers kept."""
    if isinstance(value, dict):
        return {k: _poison(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_poison(v) for v in value]
    return EVIL + value if isinstance(value, str) else value


def _poison_json(path: Path, keep: tuple[str, ...] = ()) -> None:
    data = json.loads(path.read_text())
    poisoned = _poison(data)
    for key in keep:  # fields a reader must find unchanged (formats) to accept the folder at all
        poisoned[key] = data[key]
    path.write_text(json.dumps(poisoned))


def _poison_tables(run: Path) -> None:
    import pandas as pd

    for path in (run / "tables").glob("*.csv"):
        frame = pd.read_csv(path, lineterminator="\n", keep_default_na=False, na_values=[""])
        for column in frame.columns:
            text = not pd.api.types.is_numeric_dtype(frame[column]) and not pd.api.types.is_bool_dtype(frame[column])
            if text and column != "agrees":
                frame[column] = EVIL + frame[column].astype(str)
        frame = frame.rename(columns={c: c + EVIL for c in frame.columns if c.endswith("_median")})
        frame.to_csv(path, index=False)
    for path in (run / "tables").glob("*_settings.json"):
        _poison_json(path)


@pytest.fixture(scope="module")
def run_dir(tiny_folder, tmp_path_factory) -> Path:
    return build_tiny_run(tiny_folder("gpt2"), tmp_path_factory.mktemp("hostile-run"))


@pytest.fixture(scope="module")
def hostile(run_dir, tmp_path_factory) -> Path:
    """Markup in every string of the run manifest, the atlas and values manifests' free text, and the tables."""
    run = copy_run(run_dir, tmp_path_factory.mktemp("hostile") / "run", drop=("report.html", "browser.sqlite*"))
    _poison_json(run / "manifest.json", keep=("format", "status"))
    for sub in ("atlas", "values"):
        manifest = json.loads((run / sub / "manifest.json").read_text())
        for key in ("adapter", "corpus", "versions", "distributed"):
            if key in manifest:
                manifest[key] = _poison(manifest[key])
        manifest["model"] = EVIL
        (run / sub / "manifest.json").write_text(json.dumps(manifest))
    _poison_tables(run)
    return run


def test_report_escapes_every_string_of_a_hostile_run(hostile) -> None:
    page = write_report(hostile).read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "<img src=x" not in page.lower()
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 20  # the data is shown, escaped
    assert "onerror=alert(2)&gt;&quot;&#x27;&amp;" in page


def test_show_and_browser_render_a_hostile_run(hostile, capsys) -> None:
    run = RunFolder(hostile)
    key = run.gallery(1)[2].keys[0]  # a key the mutation test measured: its table row carries markup
    assert main(["show", str(hostile), "--layer", "1", "--key", str(key)]) == 0
    assert EVIL in capsys.readouterr().out  # plain text in a terminal: shown as it is
    index = open_index(hostile)  # the browser shows data with textContent only; the index keeps the text
    assert index.is_file()


def _tamper(run_dir: Path, root: Path, name: str, edit) -> Path:
    run = copy_run(run_dir, root / name, drop=("report.html", "browser.sqlite*"))
    edit(run / "atlas")
    return run


def _tensor(name: str, change) -> object:
    def edit(atlas: Path) -> None:
        tensors = load_file(str(atlas / "atlas.safetensors"))
        tensors[name] = change(tensors[name].clone())
        save_file(tensors, str(atlas / "atlas.safetensors"))

    return edit


def _layers(value: object) -> object:
    def edit(atlas: Path) -> None:
        manifest = json.loads((atlas / "manifest.json").read_text())
        manifest["layers"] = value
        (atlas / "manifest.json").write_text(json.dumps(manifest))

    return edit


def _set(index: tuple[int, int], value: int):
    def change(t: torch.Tensor) -> torch.Tensor:
        t[index] = value
        return t

    return change


TAMPERED = [
    ("unit-not-stored", _tensor("top.1.units", _set((3, 0), 10**9)), "refers to unit 1000000000"),
    ("unit-below-minus-1", _tensor("bottom.0.units", _set((0, 0), -7)), "refers to unit -7"),
    ("position-past-unit", _tensor("top.1.positions", _set((3, 0), 10**6)), "position 1000000"),
    ("position-negative", _tensor("top.2.positions", _set((5, 1), -5)), "position -5"),
    ("units-wrong-dtype", _tensor("top.0.units", lambda t: t.float()), "expected [64, 4] int"),
    ("values-wrong-shape", _tensor("top.0.values", lambda t: t[:, :2].contiguous()), "expected [64, 4] float"),
    ("layer-markup", _layers(["<script>alert(1)</script>"]), "not an integer"),
    ("layer-out-of-model", _layers([0, 1, 7]), "layer 7 is outside the model's 3 layers"),
]


@pytest.mark.parametrize(("edit", "expected"), [t[1:] for t in TAMPERED], ids=[t[0] for t in TAMPERED])
def test_tampered_atlas_is_refused_in_one_line(run_dir, tmp_path, capsys, edit, expected) -> None:
    run = _tamper(run_dir, tmp_path, "run", edit)
    for argv in (["show", str(run), "--layer", "1", "--key", "3"], ["report", str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("ffkv-lens: error: ") and err.count("\n") == 1 and expected in err, err
        assert "<script" not in err or "not an integer" in err  # the refused value is quoted, not rendered
    with pytest.raises(DamagedFileError, match="atlas"):
        open_index(run)
    assert not (run / "report.html").exists()
