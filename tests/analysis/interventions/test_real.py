"""The worked example of docs/interventions.md from the command line, on SmolLM2-135M (slow)."""

import pytest

from ffkv_lens.cli import main

PARIS_MEMORIES = ["24:1005", "28:625", "27:1392", "29:238,1066,1285,511,1498", "22:916", "25:1120"]


@pytest.mark.slow
def test_trace_cli_ablating_the_top10_paris_memories(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["trace", "--model", "smollm2-135m", "--device", "cpu", "The capital of France is"]
    for spec in PARIS_MEMORIES:
        args += ["--zero", spec]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "== without edits ==" in out and "== with edits: zero 24:1005 at all;" in out
    assert "prediction: ' Paris' p=0.7491" in out and "prediction: ' The' p=0.0449" in out
    assert "p(' Paris'): 0.7491 -> 0.0403 (-0.7088)" in out
