"""Declarative descriptions of the architecture families ffkv_lens supports.

Each family is one small frozen :class:`FamilySpec` registered in :data:`FAMILIES`.
A spec says only what differs between families (block layout, norm gain convention,
post-FFN norm, readout head); the backends (:mod:`ffkv_lens.adapters.bridge`) read it.
To add a family, write a spec and call :func:`register_family` (see docs/adapters.md).

Example:
    >>> from ffkv_lens.adapters.families import family_for_architecture
    >>> family_for_architecture("LlamaForCausalLM").name
    'llama'
"""

from dataclasses import dataclass
from typing import Literal

from ffkv_lens.errors import ConfigError, UnsupportedArchitectureError

__all__ = [
    "FAMILIES",
    "FamilySpec",
    "family_for_architecture",
    "register_family",
    "supported_architectures",
]

BlockLayout = Literal["sequential", "parallel", "post_norm"]
Readout = Literal["unembed", "mlm_head"]
_LAYOUTS = ("sequential", "parallel", "post_norm")
_READOUTS = ("unembed", "mlm_head")


@dataclass(frozen=True)
class FamilySpec:
    """What ffkv_lens needs to know about one architecture family.

    Attributes:
        name: Short family name, e.g. ``"llama"``; reported as ``MemoryLens.architecture``.
        architectures: Hugging Face ``config.architectures`` class names of the family.
        gated: Whether the MLP is gated (``act(x W_gate) * (x W_in)``).
        layout: ``"sequential"`` (pre-norm, FFN after attention), ``"parallel"`` (attention and
            FFN both read the block input; may be switched off per model, e.g. GPT-NeoX
            ``use_parallel_residual=False``) or ``"post_norm"`` (BERT: norm after each sum).
        norm_gain_offset: Added to a norm's stored weight to get its gain (Gemma: ``1 + w``).
        post_ffn_norm: Whether the FFN output passes a norm (``ln2_post``) before being added
            to the residual stream (Gemma 2/3).
        readout: ``"unembed"`` (final norm + unembedding) or ``"mlm_head"`` (BERT's
            dense + activation + norm + decoder).
        causal: Whether a position sees only itself and earlier positions (decoders); False for
            bidirectional encoders (BERT). Analyses that reuse one forward pass for all prefixes
            of a sequence (the mutation test's shared strategy) need it.
        notes: One line for the family table in docs/adapters.md.
    """

    name: str
    architectures: tuple[str, ...]
    gated: bool
    layout: BlockLayout = "sequential"
    norm_gain_offset: float = 0.0
    post_ffn_norm: bool = False
    readout: Readout = "unembed"
    causal: bool = True
    notes: str = ""

    def __post_init__(self) -> None:
        if self.layout not in _LAYOUTS:
            raise ConfigError(f"FamilySpec.layout={self.layout!r}; allowed: {_LAYOUTS}.")
        if self.readout not in _READOUTS:
            raise ConfigError(f"FamilySpec.readout={self.readout!r}; allowed: {_READOUTS}.")
        if not self.architectures:
            raise ConfigError(f"FamilySpec {self.name!r} names no architectures; give at least one.")


FAMILIES: dict[str, FamilySpec] = {}
_BY_ARCHITECTURE: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add a family to the registry (later registrations of an architecture win).

    Args:
        spec: The family description.

    Returns:
        The same spec, so this can be used at module level.
    """
    FAMILIES[spec.name] = spec
    for arch in spec.architectures:
        _BY_ARCHITECTURE[arch] = spec
    return spec


def supported_architectures() -> list[str]:
    """Names of every Hugging Face architecture with a registered family, sorted."""
    return sorted(_BY_ARCHITECTURE)


def family_for_architecture(architecture: str) -> FamilySpec:
    """Look up the family of a Hugging Face architecture class name.

    Args:
        architecture: e.g. ``"GPT2LMHeadModel"``.

    Returns:
        The registered :class:`FamilySpec`.

    Raises:
        UnsupportedArchitectureError: If no family covers ``architecture``.
    """
    try:
        return _BY_ARCHITECTURE[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"No ffkv_lens adapter for architecture {architecture!r}. Supported: "
            f"{', '.join(supported_architectures())}. To add one, register a FamilySpec "
            "(see docs/adapters.md)."
        ) from None


for _spec in (
    FamilySpec("gpt2", ("GPT2LMHeadModel",), gated=False, notes="Conv1D weights, tied unembedding"),
    FamilySpec(
        "gpt_neox",
        ("GPTNeoXForCausalLM",),
        gated=False,
        layout="parallel",
        notes="parallel when use_parallel_residual; FFN reads ln2(resid_pre); no BOS by default",
    ),
    FamilySpec("opt", ("OPTForCausalLM",), gated=False, notes="ReLU FFN like the paper's model"),
    FamilySpec("gptj", ("GPTJForCausalLM",), gated=False, layout="parallel", notes="parallel, FFN reads ln1 output"),
    FamilySpec("llama", ("LlamaForCausalLM",), gated=True, notes="gated SiLU, RMSNorm"),
    FamilySpec("mistral", ("MistralForCausalLM",), gated=True, notes="gated SiLU, RMSNorm"),
    FamilySpec("qwen2", ("Qwen2ForCausalLM",), gated=True, notes="gated SiLU, no BOS by default"),
    FamilySpec("qwen3", ("Qwen3ForCausalLM",), gated=True, notes="gated SiLU, q/k norms"),
    FamilySpec(
        "gemma2",
        ("Gemma2ForCausalLM",),
        gated=True,
        norm_gain_offset=1.0,
        post_ffn_norm=True,
        notes="post-FFN RMSNorm (gain 1+w), logits soft-capped",
    ),
    FamilySpec(
        "gemma3",
        ("Gemma3ForCausalLM",),
        gated=True,
        norm_gain_offset=1.0,
        post_ffn_norm=True,
        notes="post-FFN RMSNorm (gain 1+w)",
    ),
    FamilySpec("phi", ("PhiForCausalLM",), gated=False, layout="parallel", notes="parallel, no BOS by default"),
    FamilySpec("phi3", ("Phi3ForCausalLM",), gated=True, notes="fused gate_up split by the bridge"),
    FamilySpec(
        "bert",
        ("BertForMaskedLM",),
        gated=False,
        layout="post_norm",
        readout="mlm_head",
        causal=False,
        notes="post-LN encoder; readout through the MLM head",
    ),
):
    register_family(_spec)
