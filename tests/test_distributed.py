"""torchrun with 2 CPU processes (gloo) equals one process exactly; a killed rank resumes.

Both runs compute with one thread per process (torchrun's default, set explicitly for the single
process too), so every unit's coefficients are bitwise equal and the atlas tensors, the section-5
records and every table must be *equal* (no tolerance); so are the per-memory statistics, but for
their float64 sums (1e-12 relative: the ranks' partial sums are added). The kill test SIGKILLs rank 1 after its
second checkpoint (a test-only patch in the launched script), restarts with the same world size,
checks the resume message, and compares with the uninterrupted single-process run.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.factories import TEXT

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--k", "4", "--keys-per-layer", "4", "--examples", "2", "--positions", "24", "--max-tokens", "3000",
        "--batch-tokens", "96", "--checkpoint-every", "150", "--quadrants"]  # fmt: skip
# Runs the CLI; with KILL_RANK set, that rank SIGKILLs itself after its KILL_AFTER-th checkpoint; with
# FAIL_IN=module.function set, that function raises a RuntimeError (a bug, not an FfkvLensError) on rank 0.
LAUNCH = """
import importlib, os, sys
sys.path.insert(0, {root!r})
from ffkv_lens.analysis import triggers
if os.environ.get("FAIL_IN") and os.environ.get("RANK", "0") == "0":
    module, name = os.environ["FAIL_IN"].rsplit(".", 1)
    def fail(*args, **kwargs):
        raise RuntimeError("injected bug in " + name)
    setattr(importlib.import_module(module), name, fail)
if os.environ.get("KILL_RANK") is not None and os.environ["KILL_RANK"] == os.environ.get("RANK", "0"):
    original, count = triggers.TriggerSearch.save_checkpoint, [0]
    def save_then_die(self, folder):
        original(self, folder)
        count[0] += 1
        if count[0] == int(os.environ["KILL_AFTER"]):
            os.kill(os.getpid(), 9)
    triggers.TriggerSearch.save_checkpoint = save_then_die
from ffkv_lens.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def setup(tiny_folder, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    corpus = root / "corpus.txt"
    corpus.write_text((TEXT + "\n") * 6)
    script = root / "launch.py"
    script.write_text(LAUNCH.format(root=str(ROOT)))
    model = str(tiny_folder("llama"))
    single = root / "single"
    done = _launch(script, 1, [*_run_args(model, corpus, single)])
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "corpus": corpus, "script": script, "model": model, "single": single}


def _run_args(model: str, corpus: Path, out: Path) -> list[str]:
    return ["-v", "run", "--model", model, "--corpus", str(corpus), "--out", str(out), "--device", "cpu", *ARGS]


def _launch(script: Path, nproc: int, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env)
    if nproc == 1:
        command = [sys.executable, str(script), *argv]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   str(script), *argv]  # fmt: skip
    return subprocess.run(command, env=environ, capture_output=True, text=True, timeout=600)


def _assert_same_results(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "atlas" / "atlas.safetensors")), load_file(str(b / "atlas" / "atlas.safetensors"))
    assert sorted(ta) == sorted(tb)
    for name, tensor in ta.items():
        assert torch.equal(tensor, tb[name]), name
    # Per-memory statistics: exact but for the float64 sums, which add the ranks' partial sums (1e-12 relative).
    sa, sb = load_file(str(a / "atlas" / "stats.safetensors")), load_file(str(b / "atlas" / "stats.safetensors"))
    assert sorted(sa) == sorted(sb) and sa
    for name, tensor in sa.items():
        exact = not name.endswith((".sums", ".squares"))
        torch.testing.assert_close(sb[name], tensor, rtol=0 if exact else 1e-12, atol=0, equal_nan=True, msg=name)
    tables = sorted(p.name for p in (a / "tables").glob("*.csv"))
    assert tables == sorted(p.name for p in (b / "tables").glob("*.csv")) and len(tables) >= 7
    for name in tables:
        assert (a / "tables" / name).read_text() == (b / "tables" / name).read_text(), name


def test_two_gloo_processes_equal_one_process(setup) -> None:
    out = setup["root"] / "two"
    done = _launch(setup["script"], 2, _run_args(setup["model"], setup["corpus"], out))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_results(setup["single"], out)
    import json

    # The search really was split (each rank's checkpoints are gone with the finished search).
    progress = json.loads((out / "atlas" / "manifest.json").read_text())["progress"]
    assert sum(rank["units"] for rank in progress["per_rank"]) == progress["units"] and not (out / "search").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["distributed"] == {"world_size": 2, "backend": "gloo"} and manifest["status"] == "finished"
    batches = [rank["batches"] for rank in progress["per_rank"]]
    assert min(batches) >= 2 and abs(batches[0] - batches[1]) <= 1


def test_killed_rank_resumes_and_other_world_size_is_refused(setup) -> None:
    out = setup["root"] / "killed"
    argv = _run_args(setup["model"], setup["corpus"], out)
    killed = _launch(setup["script"], 2, argv, KILL_RANK="1", KILL_AFTER="2")
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert (out / "search" / "rank1-of-2" / "checkpoint" / "progress.json").exists()
    assert not (out / "atlas").exists()
    # A single process on this folder is refused: its checkpoints belong to a 2-process run.
    refused = _launch(setup["script"], 1, argv)
    assert refused.returncode == 2 and "2 process(es)" in refused.stderr and "nproc-per-node 2" in refused.stderr
    resumed = _launch(setup["script"], 2, argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "rank1-of-2" in resumed.stderr
    _assert_same_results(setup["single"], out)


EXIT_WITHIN = 90.0  # generous bound, seconds, for both ranks to exit after rank 0 fails (the hang was 12 h)


@pytest.mark.parametrize(
    "fail_in",
    ["ffkv_lens.analysis.values.project_values", "ffkv_lens.analysis.agreement.value_agreement"],
    ids=["values-while-rank1-waits-in-a-collective", "agreement-after-rank1-finished-its-share"],
)
def test_rank0_bug_in_its_solo_step_stops_every_rank(setup, fail_in) -> None:
    # Two processes started by hand (no torchrun agent to kill the survivor), rendezvous on loopback.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               WORLD_SIZE="2", FAIL_IN=fail_in)  # fmt: skip
    out = setup["root"] / fail_in
    argv = [sys.executable, str(setup["script"]), *_run_args(setup["model"], setup["corpus"], out)]
    logs = [setup["root"] / f"{fail_in}.rank{r}.log" for r in (0, 1)]
    ranks = []
    for r, log in enumerate(logs):
        with log.open("w") as sink:
            env_r = dict(env, RANK=str(r), LOCAL_RANK=str(r))
            ranks.append(subprocess.Popen(argv, env=env_r, stdout=sink, stderr=subprocess.STDOUT))
    try:
        ranks[0].wait(timeout=600)
        ranks[1].wait(timeout=EXIT_WITHIN)  # without the fix it waits in a collective (or exits 0 early)
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    errors = [log.read_text() for log in logs]
    name = fail_in.rsplit(".", 1)[1]
    assert ranks[0].returncode != 0 and f"RuntimeError: injected bug in {name}" in errors[0], errors[0][-3000:]
    assert ranks[1].returncode != 0 and "rank 0 failed" in errors[1], errors[1][-3000:]
    assert f"RuntimeError: injected bug in {name}" in errors[1], errors[1][-3000:]
