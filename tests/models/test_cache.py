"""The embedded-model layer: registry, path resolution, atomic and concurrent conversion, real models.

Unit tests fake the GGUF file and the dequantisation; tests marked ``slow`` convert or load the
real embedded models (the real-model ones use the default cache so later runs reuse it).
"""

import dataclasses
import errno
import hashlib
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from ffkv_lens import models
from ffkv_lens.errors import ConfigError, DiskFullError, ModelConversionError, ModelNotAvailableError
from ffkv_lens.models import cache as model_cache
from ffkv_lens.models import conversion, registry
from ffkv_lens.storage.diskfull import format_bytes

SMOL = "smollm2-135m"
GEMMA = "gemma3-270m"
CHILD_TIMEOUT_S = 300


# ---- fakes, module level so that spawned processes can use them ----------------------------------


def _fake_locate(entry: models.EmbeddedModel) -> Path:
    path = Path(os.environ[models.CACHE_ENV_VAR]).parent / f"{entry.name}.gguf"
    path.write_bytes(b"GGUF fake")
    return path


def _fake_convert(entry: models.EmbeddedModel, gguf_path: Path, out: Path) -> None:
    (out / "config.json").write_text(json.dumps({"model_type": "fake"}))
    (out / "model.safetensors").write_bytes(b"weights")
    counter = os.environ.get("FFKV_TEST_COUNTER")
    if counter:  # record each conversion; O_APPEND keeps concurrent lines whole
        with open(counter, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # widen the window in which a second process could race


def _half_convert_then_hang(entry: models.EmbeddedModel, gguf_path: Path, out: Path) -> None:
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"half")
    Path(os.environ["FFKV_TEST_STARTED"]).touch()
    time.sleep(CHILD_TIMEOUT_S)


def _wait_for_peers(barrier: str, parties: int) -> None:
    """A file barrier: return once ``parties`` processes have reached it (so they really race)."""
    Path(barrier, str(os.getpid())).touch()
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while len(list(Path(barrier).iterdir())) < parties and time.monotonic() < deadline:
        time.sleep(0.01)


def _child_convert(cache: str, name: str, mode: str, extra_env: dict[str, str]) -> str:
    """Run ``convert_model`` in a spawned process; ``mode`` is "fake", "hang" or "real"."""
    os.environ.update({models.CACHE_ENV_VAR: cache, "HF_HUB_OFFLINE": "1", **extra_env})
    if mode != "real":
        model_cache._locate_gguf = _fake_locate
        model_cache._convert_into = _fake_convert if mode == "fake" else _half_convert_then_hang
    if "FFKV_TEST_BARRIER" in extra_env:
        _wait_for_peers(extra_env["FFKV_TEST_BARRIER"], parties=2)
    return str(models.convert_model(name))


def _leftovers(cache: Path, name: str) -> list[Path]:
    return sorted((cache / "models").glob(f".{name}.*"))


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``$FFKV_LENS_CACHE`` for this test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(cache))
    return cache


@pytest.fixture
def fake_conversion(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fake GGUF file and dequantisation; returns the cache."""
    monkeypatch.setattr(model_cache, "_locate_gguf", _fake_locate)
    monkeypatch.setattr(model_cache, "_convert_into", _fake_convert)
    return fresh_cache


# ---- registry and resolution ---------------------------------------------------------------------


def test_registry_lists_both_models() -> None:
    assert models.list_models() == [SMOL, GEMMA]


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_model_status_describes_each_model(name: str, fresh_cache: Path) -> None:
    status = models.model_status(name)
    assert status.name == name
    assert status.pip_command.startswith("pip install ")
    assert status.folder == fresh_cache / "models" / name
    assert not status.converted


def test_model_status_rejects_unknown_name() -> None:
    with pytest.raises(ConfigError, match=r"'gpt2'.*smollm2-135m"):
        models.model_status("gpt2")


def test_cache_dir_defaults_to_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(models.CACHE_ENV_VAR, raising=False)
    assert models.cache_dir() == Path.home() / ".cache" / "ffkv_lens"


def test_resolve_local_folder_with_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)


def test_resolve_folder_without_config_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no config.json") as info:
        models.resolve_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_resolve_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file"):
        models.resolve_model(str(path))


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "dot-relative"])
def test_resolve_unknown_local_path_raises(relative: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = "./no/such/folder" if relative else str(tmp_path / "no-such-folder")
    with pytest.raises(ModelNotAvailableError, match="No model folder at") as info:
        models.resolve_model(path)
    assert path in str(info.value)


def test_resolve_hub_id_is_returned_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_resolve_empty_name_raises() -> None:
    with pytest.raises(ConfigError, match="empty"):
        models.resolve_model("  ")


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_missing_package_error_names_pip_command(name: str, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = registry.REGISTRY[name]
    monkeypatch.setitem(registry.REGISTRY, name, dataclasses.replace(entry, package="ffkv_lens_no_such_package"))
    assert not models.model_status(name).installed
    with pytest.raises(ModelNotAvailableError) as info:
        models.resolve_model(name)
    assert entry.pip_command in str(info.value)
    assert not models.model_status(name).converted


# ---- atomic, concurrency-safe conversion (fake dequantisation) ----------------------------------


def test_conversion_writes_marker(fake_conversion: Path) -> None:
    folder = Path(models.resolve_model(SMOL))
    assert folder == fake_conversion / "models" / SMOL
    marker = json.loads((folder / models.MARKER_NAME).read_text())
    assert marker["name"] == SMOL
    assert marker["source"]["size"] == len(b"GGUF fake")
    assert "transformers" in marker["versions"]
    assert models.model_status(SMOL).converted
    assert _leftovers(fake_conversion, SMOL) == []


def test_failed_conversion_leaves_no_complete_folder(fake_conversion: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def save_then_fail(entry: models.EmbeddedModel, gguf_path: Path, out: Path) -> None:
        _fake_convert(entry, gguf_path, out)
        raise RuntimeError("tensor blk.3 has an unknown quantisation")

    monkeypatch.setattr(model_cache, "_convert_into", save_then_fail)
    with pytest.raises(ModelConversionError, match="unknown quantisation"):
        models.resolve_model(SMOL)
    assert not (fake_conversion / "models" / SMOL).exists()
    assert _leftovers(fake_conversion, SMOL) == []
    assert not models.model_status(SMOL).converted

    monkeypatch.setattr(model_cache, "_convert_into", _fake_convert)
    assert Path(models.resolve_model(SMOL)).joinpath(models.MARKER_NAME).is_file()


def test_disk_full_conversion_is_one_line_error(fake_conversion: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def save_then_fill(entry: models.EmbeddedModel, gguf_path: Path, out: Path) -> None:
        _fake_convert(entry, gguf_path, out)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_cache, "_convert_into", save_then_fill)
    with pytest.raises(DiskFullError) as info:
        models.resolve_model(SMOL)
    message = str(info.value)
    assert "\n" not in message
    assert str(fake_conversion / "models" / SMOL) in message and "free there" in message and "needed" in message
    assert sorted(p.name for p in (fake_conversion / "models").iterdir()) == [f"{SMOL}.lock"]


def test_save_refuses_early_when_the_weights_cannot_fit(tiny_folder, tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_folder("llama")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    monkeypatch.setattr(conversion, "free_bytes", lambda path: needed - 1)
    out = tmp_path / f".{SMOL}.0123456789abcdef.tmp"
    out.mkdir()
    with pytest.raises(DiskFullError, match=f"{format_bytes(needed)} needed") as info:
        conversion._save(model, tokenizer, out, slot=tmp_path / SMOL)
    assert str(tmp_path / SMOL) in str(info.value)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("kind", ["no-marker", "other-model", "a-file"])
def test_slot_we_did_not_write_for_this_model_is_refused_and_kept(kind: str, fake_conversion: Path) -> None:
    target = fake_conversion / "models" / SMOL
    target.parent.mkdir(parents=True)
    if kind == "a-file":
        target.write_text("a user's file")
    else:
        target.mkdir()
        (target / "config.json").write_text("{}")  # looks like a model folder
        if kind == "other-model":
            models.convert_model(GEMMA)
            (target / models.MARKER_NAME).write_bytes(
                (fake_conversion / "models" / GEMMA / models.MARKER_NAME).read_bytes()
            )
    before = {p: p.read_bytes() for p in ([target] if target.is_file() else target.iterdir())}
    assert not models.model_status(SMOL).converted
    with pytest.raises(ModelConversionError, match="will not replace it") as info:
        models.resolve_model(SMOL)
    assert "\n" not in str(info.value) and str(target) in str(info.value)
    assert {p: p.read_bytes() for p in ([target] if target.is_file() else target.iterdir())} == before


def _counting_convert(counter: list[str]):
    def convert(entry: models.EmbeddedModel, gguf_path: Path, out: Path) -> None:
        _fake_convert(entry, gguf_path, out)
        counter.append(entry.name)

    return convert


def _fixed_gguf(cache: Path, content: bytes):
    """A fake GGUF file written once (``_fake_locate`` rewrites it on every call)."""
    path = cache.parent / "fixed.gguf"
    path.write_bytes(content)
    return lambda entry: path


def test_marker_records_source_and_versions(fake_conversion: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_cache, "_locate_gguf", _fixed_gguf(fake_conversion, b"GGUF one"))
    marker = json.loads((models.convert_model(SMOL) / models.MARKER_NAME).read_text())
    source = Path(marker["source"]["path"])
    assert marker["format"] == model_cache._FORMAT_VERSION and marker["name"] == SMOL
    assert marker["source"]["size"] == 8 and marker["source"]["mtime_ns"] == source.stat().st_mtime_ns
    assert marker["source"]["sha256"] == hashlib.sha256(b"GGUF one").hexdigest()
    assert marker["versions"][registry.REGISTRY[SMOL].distribution] is not None


@pytest.mark.parametrize("change", ["old-marker", "damaged-marker", "source-replaced", "package-upgraded"])
def test_stale_conversion_is_converted_again(change: str, fake_conversion: Path, monkeypatch) -> None:
    conversions: list[str] = []
    monkeypatch.setattr(model_cache, "_convert_into", _counting_convert(conversions))
    monkeypatch.setattr(model_cache, "_locate_gguf", _fixed_gguf(fake_conversion, b"GGUF one"))
    folder = models.convert_model(SMOL)
    marker_path = folder / models.MARKER_NAME
    assert models.convert_model(SMOL) == folder and conversions == [SMOL]  # a valid slot is reused
    if change == "old-marker":  # the format-1 marker: size and float mtime, no sha256
        marker = json.loads(marker_path.read_text())
        marker.update(format=1, source={"path": marker["source"]["path"], "size": 8, "mtime": 1.0})
        marker_path.write_text(json.dumps(marker))
    elif change == "damaged-marker":
        marker_path.write_text('{"format": 2, "na')
    elif change == "source-replaced":
        monkeypatch.setattr(model_cache, "_locate_gguf", _fixed_gguf(fake_conversion, b"GGUF two, longer"))
    else:
        monkeypatch.setattr(model_cache, "_installed_version", lambda distribution: "999.0")
    assert not models.model_status(SMOL).converted
    assert models.convert_model(SMOL) == folder
    assert conversions == [SMOL, SMOL]
    assert json.loads(marker_path.read_text())["format"] == model_cache._FORMAT_VERSION
    assert _leftovers(fake_conversion, SMOL) == []


def test_touched_source_with_same_content_is_not_converted_again(fake_conversion: Path, monkeypatch) -> None:
    conversions: list[str] = []
    monkeypatch.setattr(model_cache, "_convert_into", _counting_convert(conversions))
    locate = _fixed_gguf(fake_conversion, b"GGUF one")
    monkeypatch.setattr(model_cache, "_locate_gguf", locate)
    models.convert_model(SMOL)
    source = locate(None)
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # e.g. a reinstall
    assert models.convert_model(SMOL) == fake_conversion / "models" / SMOL
    assert conversions == [SMOL]
    source.write_bytes(b"GGUF 1ne")  # same size, other content
    models.convert_model(SMOL)
    assert conversions == [SMOL, SMOL]


def test_force_replaces_a_complete_folder(fake_conversion: Path) -> None:
    first = models.convert_model(SMOL)
    (first / "stale.txt").write_text("from the previous conversion")
    second = models.convert_model(SMOL, force=True)
    assert second == first
    assert not (second / "stale.txt").exists()
    assert models.model_status(SMOL).converted
    assert _leftovers(fake_conversion, SMOL) == []


def test_killed_conversion_is_ignored_then_redone(fresh_cache: Path, tmp_path: Path) -> None:
    started = tmp_path / "started"
    context = multiprocessing.get_context("spawn")
    child = context.Process(
        target=_child_convert, args=(str(fresh_cache), SMOL, "hang", {"FFKV_TEST_STARTED": str(started)})
    )
    child.start()
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not started.exists() and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), "the child never reached the middle of its conversion"
    os.kill(child.pid, signal.SIGKILL)
    child.join(CHILD_TIMEOUT_S)

    # its half-written temporary folder and the lock file that shows it belongs to a dead save
    assert sorted(p.suffix for p in _leftovers(fresh_cache, SMOL)) == [".lock", ".tmp"]
    assert not models.model_status(SMOL).converted
    # The dead child's lock is released: converting again in another process finishes.
    with context.Pool(1) as pool:
        folder = pool.apply(_child_convert, (str(fresh_cache), SMOL, "fake", {}))
    assert models.model_status(SMOL).converted
    assert folder == str(fresh_cache / "models" / SMOL)
    assert _leftovers(fresh_cache, SMOL) == []


def test_concurrent_conversions_convert_once(fresh_cache: Path, tmp_path: Path) -> None:
    counter, barrier = tmp_path / "conversions.txt", tmp_path / "barrier"
    barrier.mkdir()
    args = (str(fresh_cache), SMOL, "fake", {"FFKV_TEST_COUNTER": str(counter), "FFKV_TEST_BARRIER": str(barrier)})
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        folders = pool.starmap(_child_convert, [args, args])
    assert folders == [str(fresh_cache / "models" / SMOL)] * 2
    assert len(counter.read_text().splitlines()) == 1
    assert models.model_status(SMOL).converted
    assert _leftovers(fresh_cache, SMOL) == []


# ---- load_model argument checks (no model is loaded) ---------------------------------------------


@pytest.mark.parametrize("dtype", ["int8", torch.int64], ids=["name", "torch-dtype"])
def test_load_model_rejects_bad_dtype(dtype: object) -> None:
    from ffkv_lens.adapters.loading import load_model

    with pytest.raises(ConfigError, match="dtype"):
        load_model(SMOL, dtype=dtype)


@pytest.mark.parametrize("device", ["gpu0", "cuda:99"], ids=["not-a-device", "missing-cuda"])
def test_load_model_rejects_bad_device(device: str) -> None:
    from ffkv_lens.adapters.loading import load_model

    with pytest.raises(ConfigError, match="device"):
        load_model(SMOL, device=device)


def test_load_model_unreachable_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ffkv_lens.adapters.loading import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotAvailableError, match="ffkv-lens-test/no-such-model"):
        load_model("ffkv-lens-test/no-such-model", device="cpu")


# ---- real models (slow) --------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_real_conversion(fresh_cache: Path, tmp_path: Path) -> None:
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    args = (str(fresh_cache), SMOL, "real", {"FFKV_TEST_BARRIER": str(barrier)})
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        folders = pool.starmap(_child_convert, [args, args])
    folder = fresh_cache / "models" / SMOL
    assert folders == [str(folder)] * 2
    assert models.model_status(SMOL).converted
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert _leftovers(fresh_cache, SMOL) == []


def _greedy_next_token(bridge: object, prompt: str) -> str:
    tokens = bridge.to_tokens(prompt)
    with torch.no_grad():
        logits = bridge(tokens)
    return bridge.tokenizer.decode([int(logits[0, -1].argmax())])


@pytest.fixture(scope="session")
def smollm2_bridge() -> object:
    """SmolLM2-135M-Instruct, converted into the default cache once and loaded once."""
    from ffkv_lens.adapters.loading import load_model

    return load_model(SMOL, device="cpu")


@pytest.fixture(scope="session")
def gemma3_bridge() -> object:
    """Gemma 3 270M, converted into the default cache once and loaded once."""
    from ffkv_lens.adapters.loading import load_model

    return load_model(GEMMA, device="cpu")


@pytest.mark.slow
def test_smollm2_shapes(smollm2_bridge: object) -> None:
    cfg = smollm2_bridge.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.d_vocab) == (30, 576, 1536, 49152)


@pytest.mark.slow
def test_smollm2_predicts_paris(smollm2_bridge: object) -> None:
    assert _greedy_next_token(smollm2_bridge, "The capital of France is") == " Paris"


@pytest.mark.slow
def test_gemma3_shapes(gemma3_bridge: object) -> None:
    cfg = gemma3_bridge.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.d_vocab) == (18, 640, 2048, 262144)


@pytest.mark.slow
def test_gemma3_prepends_one_bos(gemma3_bridge: object) -> None:
    tokens = gemma3_bridge.to_tokens("The capital of France is")[0].tolist()
    bos = gemma3_bridge.tokenizer.bos_token_id
    assert tokens[0] == bos and tokens[1] != bos


@pytest.mark.slow
@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("The Eiffel Tower is located in the city of", " Paris"),
        ("Paris is the capital of", " France"),
        ("The opposite of hot is", " cold"),
    ],
    ids=["eiffel-paris", "paris-france", "hot-cold"],
)
def test_gemma3_predicts_sensibly(gemma3_bridge: object, prompt: str, expected: str) -> None:
    assert _greedy_next_token(gemma3_bridge, prompt) == expected
