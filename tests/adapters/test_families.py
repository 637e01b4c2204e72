import pytest

from ffkv_lens import MemoryLens
from ffkv_lens.adapters import FAMILIES, FamilySpec, make_adapter
from ffkv_lens.adapters.families import family_for_architecture, supported_architectures
from ffkv_lens.errors import ConfigError, UnsupportedArchitectureError
from tests.factories import FAMILY_NAMES


def test_every_tested_family_is_registered() -> None:
    assert set(FAMILY_NAMES) <= set(FAMILIES)
    assert len(supported_architectures()) >= 13


def test_unsupported_architecture_names_it_and_lists_supported() -> None:
    with pytest.raises(UnsupportedArchitectureError) as err:
        family_for_architecture("MambaForCausalLM")
    assert "MambaForCausalLM" in str(err.value)
    assert "LlamaForCausalLM" in str(err.value) and "GPT2LMHeadModel" in str(err.value)


def test_spec_validation_lists_allowed_values() -> None:
    # Under the test-time type checker a bad Literal is refused before __post_init__ runs;
    # exercise our own validation (what users without beartype get) directly.
    spec = FamilySpec("x", ("X",), gated=False)
    object.__setattr__(spec, "layout", "weird")
    with pytest.raises(ConfigError, match="layout='weird'.*allowed"):
        spec.__post_init__()


def test_non_model_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="got builtins.str"):
        MemoryLens("gpt2")
    with pytest.raises(ConfigError, match="TransformerBridge"):
        make_adapter(object())


def test_shapes_are_checked_at_test_time(tiny_bridge) -> None:
    """The jaxtyping import hook (pyproject addopts) checks public shapes under pytest."""
    import torch

    lens = MemoryLens(tiny_bridge("llama"))
    with pytest.raises(Exception, match="d_mlp|shape|dimension"):
        lens.ffn_output(0, torch.zeros(2, 5))
