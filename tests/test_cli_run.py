"""`ffkv-lens run`'s flags are derived from RunConfig: one per field, with its type, default and help."""

import argparse
import dataclasses

import pytest

from ffkv_lens.cli import _parser, main


def _run_parser():
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"]


def test_every_run_config_field_has_a_flag_with_its_default() -> None:
    from ffkv_lens.pipeline import RunConfig

    actions = {a.dest: a for a in _run_parser()._actions}
    for field in dataclasses.fields(RunConfig):
        assert field.name in actions, f"RunConfig.{field.name} has no `ffkv-lens run` flag"
        assert actions[field.name].default == field.default
    assert {a.dest for a in actions.values()} - {f.name for f in dataclasses.fields(RunConfig)} == {
        "help",
        "out",
        "force",
    }
    assert actions["unit"].choices == ["sentence", "document", "window"] and actions["signed"].option_strings == [
        "--unsigned"
    ]
    args = _run_parser().parse_args(["--max-tokens", "all", "--unsigned", "--seed", "0", "--out", "x"])
    assert args.max_tokens is None and args.signed is False and args.seed == 0
    assert RunConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)}).signed is False


def test_run_help_shows_every_default(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())  # past the usage line
    for flag, default in (("--k K", 50), ("--batch-tokens BATCH_TOKENS", 2048), ("--max-tokens MAX_TOKENS", 50000),
                          ("--dtype {float32,float64,bfloat16,float16}", "float32"), ("--seed SEED", 0)):  # fmt: skip
        assert flag in text and f"(default {default})" in text.split(flag, 1)[1].split(" --", 1)[0]
    assert "Trigger examples per key." in text  # help comes from RunConfig's docstring


def test_run_rejects_a_non_positive_integer(capsys) -> None:
    with pytest.raises(SystemExit):
        _run_parser().parse_args(["--k", "0", "--out", "x"])
    assert "'0' is not a positive integer" in capsys.readouterr().err
