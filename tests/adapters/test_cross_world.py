"""HookedTransformer under transformer-lens 3.x vs TransformerBridge under 4.x, on the same weights.

Runs in the 4.x environment when the 3.x one exists (``FFKV_TL3_PYTHON``, default
``.venv-tl3/bin/python``): a subprocess there builds the tiny models as HookedTransformers
(tl3_dump.py) and this process compares with the 4.x bridge. Tolerances (fp32): coefficients,
value logits and contributions 1e-5 relative; trigger atlas: equal units and positions at every
rank, values within 1e-4.
"""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from ffkv_lens import MemoryLens
from tests.adapters.checks import assert_atlases_equivalent
from tests.adapters.tl3_dump import compute
from tests.conftest import has_hooked_transformer
from tests.helpers import assert_close

ROOT = Path(__file__).resolve().parents[2]
TL3_PYTHON = Path(os.environ.get("FFKV_TL3_PYTHON", ROOT / ".venv-tl3" / "bin" / "python"))
FAMILIES = ["gpt2", "opt", "llama", "gemma2", "gemma3", "phi"]

if has_hooked_transformer():
    pytest.skip("compares with transformer-lens 3.x from a 4.x environment", allow_module_level=True)
if not TL3_PYTHON.exists():
    pytest.skip(
        f"no transformer-lens 3.x environment at {TL3_PYTHON} (docs/transformerlens.md)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def dumped(tiny_folder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tl3")
    args = [f"{family}={tiny_folder(family)}" for family in FAMILIES]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [str(TL3_PYTHON), "-m", "tests.adapters.tl3_dump", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"the transformer-lens 3.x side failed:\n{done.stderr[-4000:]}"
    return out


@pytest.mark.parametrize("processed", ["raw", "processed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_hooked_on_tl3_equals_bridge_on_tl4(dumped: Path, tiny_bridge, family: str, processed: str) -> None:
    from safetensors.torch import load_file

    from ffkv_lens.analysis.atlas import TriggerAtlas

    theirs = load_file(str(dumped / f"{family}-{processed}" / "tensors.safetensors"))
    mine, atlas = compute(MemoryLens(tiny_bridge(family)))
    assert torch.equal(theirs["tokens"], mine["tokens"])
    for name, tensor in mine.items():
        if name != "tokens":
            assert_close(theirs[name], tensor, rel=1e-5, what=f"{family} {processed} {name}")
    reference = TriggerAtlas.load(dumped / f"{family}-{processed}" / "atlas")
    assert assert_atlases_equivalent(atlas, reference, rel=1e-4, tie_rel=0.0, what=family) == 0
