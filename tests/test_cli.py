"""The `report` and `show` subcommands on a tiny finished run, and every bad input they refuse."""

import json
import re

import pytest

from ffkv_lens.analysis.atlas import TriggerExample
from ffkv_lens.cli import main
from ffkv_lens.report import RunFolder
from ffkv_lens.report.figures import FIGURES
from ffkv_lens.report.memories import format_card, printable
from ffkv_lens.report.memory_stats import NO_STATS, sparkline
from tests.report.runs import build_tiny_run, copy_run, without_stats


@pytest.fixture(scope="module")
def run_dir(tiny_folder, tmp_path_factory):
    return build_tiny_run(tiny_folder("gpt2"), tmp_path_factory.mktemp("cli-run"))


def _show(run_dir, *args: str) -> list[str]:
    return ["show", str(run_dir), *args]


def test_show_prints_examples_with_the_peak_marked(run_dir, capsys) -> None:
    run = RunFolder(run_dir)
    key = run.gallery(1)[2].keys[0]  # a key the mutation test measured
    assert main(_show(run_dir, "--layer", "1", "--key", str(key), "--examples", "2")) == 0
    out = capsys.readouterr().out
    card = run.card(1, key, examples=2)
    assert out.startswith(f"layer 1, key {key}: top-k trigger examples, 2 of {card.kept} kept")
    examples = [line for line in out.splitlines() if re.match(r"\s+\d+\. m=", line)]
    assert len(examples) == 2
    first = card.examples[0]
    assert f"[[{first.peak}]] -> {first.next_token!r}" in examples[0] and f"m={first.coefficient:+.4g}" in examples[0]
    assert "value top tokens (logit): " in out and "value bottom tokens (logit): " in out
    top_token, top_logit = card.top_tokens[0]
    assert f"{top_token!r} {top_logit:+.3g}" in out
    assert "mutation test: " in out and "agreement: " in out and "\x1b[" not in out


def test_show_prints_the_causal_score_of_a_sampled_memory(run_dir, capsys) -> None:
    run = RunFolder(run_dir)
    sampled = run.table("causal_per_memory")
    row = sampled[sampled["layer"] == 1].iloc[0]
    assert main(_show(run_dir, "--layer", "1", "--key", str(int(row["key"])))) == 0
    out = capsys.readouterr().out
    assert f"causal score {row['causal_score']:+.4g} (zeroed on {int(row['n_examples'])} trigger examples" in out
    untested = next(k for k in range(run.manifest["layout"]["d_mlp"]) if k not in set(sampled["key"]))
    assert main(_show(run_dir, "--layer", "1", "--key", str(untested))) == 0
    assert "causal score" not in capsys.readouterr().out


def test_show_colour_and_negative_side(run_dir, capsys) -> None:
    assert main(_show(run_dir, "--layer", "0", "--key", "5", "--sign", "-1", "--color", "always")) == 0
    out = capsys.readouterr().out
    assert "bottom-k (most negative) trigger examples" in out and "\x1b[1;7m" in out and "[[" not in out
    assert "agreement: " not in out  # the per-memory agreement table reads the top-k side only


@pytest.fixture(scope="module")
def broken(run_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("broken")
    (root / "not-a-run").mkdir()
    (root / "a-file").write_text("x")
    (root / "foreign").mkdir()
    (root / "foreign" / "manifest.json").write_text('{"format": "some-other-tool/2"}')
    unsigned = copy_run(run_dir, root / "unsigned")
    manifest = json.loads((unsigned / "atlas" / "manifest.json").read_text())
    manifest["settings"]["signed"] = False
    (unsigned / "atlas" / "manifest.json").write_text(json.dumps(manifest))
    later = ("triggers", "values", "agreement", "causal", "mutation", "dynamics", "figures", "report")
    no_atlas = copy_run(run_dir, root / "no-atlas", drop_steps=later, drop=("atlas", "values", "tables", "figures"))
    return {"root": root, "unsigned": unsigned, "no_atlas": no_atlas}


# (case id, run folder (key of `broken`, or "run"), extra arguments, what the one-line error must say)
BAD = [
    ("missing-folder", "missing", ("--layer", "0", "--key", "0"), ["'", "missing' does not exist", "--out"]),
    ("file-not-folder", "a-file", ("--layer", "0", "--key", "0"), ["a-file' is not a folder"]),
    ("no-manifest", "not-a-run", ("--layer", "0", "--key", "0"), ["not-a-run' is not a run folder (no manifest.json)"]),
    ("foreign-manifest", "foreign", ("--layer", "0", "--key", "0"), ["format 'some-other-tool/2'", "not an ffkv"]),
    ("no-atlas", "no_atlas", ("--layer", "0", "--key", "0"), ["no trigger atlas yet", "'running'", "re-running"]),
    ("layer-too-high", "run", ("--layer", "3", "--key", "0"), ["layer 3 is out of range", "layers 0 to 2"]),
    ("layer-negative", "run", ("--layer", "-1", "--key", "0"), ["layer -1 is out of range", "layers 0 to 2"]),
    ("key-too-high", "run", ("--layer", "0", "--key", "64"), ["key 64 is out of range", "keys 0 to 63 (d_mlp 64)"]),
    ("key-negative", "run", ("--layer", "0", "--key", "-3"), ["key -3 is out of range", "keys 0 to 63"]),
    ("sign-unsigned", "unsigned", ("--layer", "0", "--key", "0", "--sign", "-1"), ["sign -1", "--unsigned", "sign 1"]),
]


@pytest.mark.parametrize(("folder", "args", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_show_bad_input_is_one_line_with_exit_2(run_dir, broken, capsys, folder, args, expected) -> None:
    path = run_dir if folder == "run" else broken.get(folder, broken["root"] / folder)
    assert main(_show(path, *args)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("ffkv-lens: error: ") and captured.err.count("\n") == 1, captured.err
    for text in expected:
        assert text in captured.err, captured.err


@pytest.mark.parametrize(
    "args",
    [("--layer", "0", "--key", "0", "--sign", "2"), ("--layer", "0", "--key", "0", "--examples", "0"),
     ("--key", "0",), ("--layer", "x", "--key", "0")],
    ids=["sign-2", "examples-0", "no-layer", "layer-not-int"],
)  # fmt: skip
def test_show_usage_errors_exit_2(run_dir, capsys, args) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(_show(run_dir, *args))
    assert exit_info.value.code == 2 and "ffkv-lens show: error:" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["report", "show"])
def test_help(command, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and f"usage: ffkv-lens {command}" in capsys.readouterr().out


def test_report_rebuilds_the_page_and_missing_figures(run_dir, tmp_path, capsys) -> None:
    folder = copy_run(run_dir, tmp_path / "copy", drop=("figures", "report.html"))
    assert main(["report", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "redrew figures from their tables: " in out and out.strip().endswith(str(folder / "report.html"))
    assert {p.name for p in (folder / "figures").iterdir()} == {f"{n}{s}" for n in FIGURES for s in (".png", ".svg")}
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/svg+xml;base64,") == len(FIGURES)
    assert main(["report", str(folder), "--per-category", "1", "--examples", "1"]) == 0
    assert "redrew" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "expected"),
    [("missing", "does not exist"), ("not-a-run", "is not a run folder (no manifest.json)")],
    ids=["missing-folder", "no-manifest"],
)
def test_report_bad_folder(broken, capsys, name, expected) -> None:
    assert main(["report", str(broken["root"] / name)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ffkv-lens: error: ") and expected in err and err.count("\n") == 1


def test_report_on_unfinished_run_says_not_run(broken, capsys) -> None:
    assert main(["report", str(broken["no_atlas"])]) == 0
    page = (broken["no_atlas"] / "report.html").read_text(encoding="utf-8")
    assert "run unfinished" in page and page.count("not run") >= 5


def test_trace_prints_both_traces_and_generations(tiny_folder, capsys) -> None:
    folder = str(tiny_folder("llama"))
    args = ["trace", "--model", folder, "--device", "cpu", "The capital of France is"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert plain.startswith("prompt: ") and "prediction: " in plain and "== with edits" not in plain
    assert len([line for line in plain.splitlines() if re.match(r"\s+\d+  '", line)]) == 3, "one line per layer"
    edited = [*args, "--zero", "1:3,4", "--scale", "2:5=2.5", "--set", "0:7=1.5", "--generate", "3"]
    assert main(edited) == 0
    out = capsys.readouterr().out
    assert "== without edits ==" in out and "== change ==" in out and "p(" in out
    assert "== with edits: zero 1:3,4 at all; scale 2:5 x2.5 at all; set 0:7 =1.5 at all ==" in out
    assert "generation without edits: " in out and "generation with edits: " in out


@pytest.mark.parametrize(
    ("flag", "spec", "message"),
    [
        ("--zero", "3", "--zero '3' is not a memory spec"),
        ("--scale", "1:2", "--scale '1:2' is not a memory spec"),
        ("--set", "1:x=2", "--set '1:x=2' is not a memory spec"),
        ("--zero", "9:1", "layer 9 is out of range [0, 3)"),
        ("--zero", "1:64", "key 64 is out of range [0, 64)"),
    ],
    ids=["no-key", "no-value", "bad-key", "layer-range", "key-range"],
)
def test_trace_bad_memory_specs_exit_2_in_one_line(tiny_folder, capsys, flag: str, spec: str, message: str) -> None:
    assert main(["trace", "--model", str(tiny_folder("llama")), "--device", "cpu", "Hi", flag, spec]) == 2
    lines = capsys.readouterr().err.splitlines()  # after the model loader's progress bar, if any
    assert lines[-1].startswith("ffkv-lens: error: ") and message in lines[-1], lines
    assert not any("Traceback" in line for line in lines)


def _stats_lines(out: str) -> list[str]:
    lines = out.splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("histogram [")) :]


def test_show_prints_the_histogram_sparkline_and_the_quantile_samples(run_dir, capsys) -> None:
    atlas = RunFolder(run_dir).atlas
    assert atlas.has_stats
    layer, key = 1, 3
    assert main(_show(run_dir, "--layer", str(layer), "--key", str(key), "--samples", "2")) == 0
    first, *rest = _stats_lines(capsys.readouterr().out)
    counts = atlas.histogram(layer, key)["count"].tolist()
    edges = atlas.histogram_edges(layer).tolist()
    row = atlas.stats(layer, key).iloc[0]
    assert first.startswith(f"histogram [{edges[0]:+.3g}, {edges[-1]:+.3g}] {sparkline(counts)} ({len(counts)} bins")
    threshold = atlas.stats_settings["density_threshold"]
    assert f"density {row['density']:.4g} (|m| > {threshold:g})" in first and f"n {int(row['count']):,}" in first
    assert f"mean {row['mean']:+.4g}" in first and f"std {row['std']:.4g}" in first
    samples = atlas.quantile_examples(layer, key)
    groups = [line for line in rest if line.startswith("  group ")]
    assert [int(g.split()[1]) for g in groups] == sorted(samples["group"].unique().tolist())
    printed = [line for line in rest if line.startswith("     m=")]
    expected = samples.groupby("group", sort=True).head(2)
    assert len(printed) == len(expected) > 0
    for line, s in zip(printed, expected.itertuples(index=False), strict=True):
        example = TriggerExample(s.unit_id, s.doc_id, s.position, s.coefficient, s.text, None, None)
        before, token = atlas.prefix_parts(example)
        assert line.startswith(f"     m={s.coefficient:+.4g}  ") and line.endswith(f"[[{printable(token)}]]"), line
        assert printable(before)[-20:] in line


def test_show_of_a_run_without_statistics_prints_the_card_and_a_note(run_dir, tmp_path, capsys) -> None:
    old = without_stats(run_dir, tmp_path / "old")
    assert main(_show(old, "--layer", "1", "--key", "3", "--color", "never")) == 0
    card = RunFolder(old).card(1, 3, examples=10)
    assert capsys.readouterr().out == format_card(card, color=False) + "\n" + NO_STATS + "\n"
