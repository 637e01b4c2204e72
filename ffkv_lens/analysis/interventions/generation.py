"""Generate text under edits: greedy by default, seeded sampling otherwise, stopping at EOS.

Each step runs the whole sequence again (no key-value cache), so an edit acts on exactly the
positions it names in every forward pass: ``positions="last"`` edits the position whose next token
is being chosen, ``"all"`` every position of the prompt and of the text generated so far.

Example:
    >>> lens.compare_generation("The capital of France is", [Edit.zero(20, [7])])  # doctest: +SKIP
"""

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from ffkv_lens.adapters.base import MemoryAdapter
from ffkv_lens.analysis.interventions.edits import Edit, edit_hooks, validate_edits
from ffkv_lens.analysis.interventions.trace import prompt_tokens
from ffkv_lens.errors import ConfigError

__all__ = ["GenerationComparison", "compare_generation", "generate"]


class GenerationComparison(NamedTuple):
    """A prompt's continuation without and with edits.

    Attributes:
        prompt: The prompt.
        original: The continuation of the unedited model.
        edited: The continuation under ``edits``.
        edits: The edits.
    """

    prompt: str
    original: str
    edited: str
    edits: tuple[Edit, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "prompt": self.prompt,
            "original": self.original,
            "edited": self.edited,
            "edits": [edit.to_dict() for edit in self.edits],
        }

    def __str__(self) -> str:
        edits = "; ".join(edit.describe() for edit in self.edits) or "none"
        return f"prompt:   {self.prompt!r}\nwithout:  {self.original!r}\nwith:     {self.edited!r}\nedits:    {edits}"


def eos_token_id(adapter: MemoryAdapter) -> int | None:
    """The token that ends generation: the tokenizer's EOS, or ``None`` (then only the length bounds it)."""
    eos = getattr(adapter.tokenizer, "eos_token_id", None)
    return None if eos is None else int(eos)


def generate(
    adapter: MemoryAdapter,
    text: str,
    *,
    max_new_tokens: int = 20,
    edits: Edit | Iterable[Edit] | None = None,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """The continuation of ``text`` (without the prompt), under ``edits``.

    Args:
        adapter: The model's adapter.
        text: The prompt.
        max_new_tokens: Tokens generated at most; generation stops earlier at the tokenizer's EOS.
        edits: Edits to generate under; ``None`` for the model as it is.
        temperature: 0 for greedy decoding, else sampling from ``softmax(logits / temperature)``.
        seed: Seed of the sampling generator (the same seed gives the same text).

    Raises:
        ConfigError: For a non-causal model, a bad length or temperature, or a bad edit.
    """
    if not adapter.causal or adapter.spec.readout != "unembed":
        raise ConfigError(f"generate() needs a causal language model; {adapter.architecture} is not one.")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r}; pass an integer >= 0.")
    if not isinstance(temperature, int | float) or not 0 <= temperature < float("inf"):
        raise ConfigError(f"temperature={temperature!r}; pass 0 (greedy) or a positive number.")
    hooks = edit_hooks(adapter, validate_edits(adapter, () if edits is None else edits))
    tokens = prompt_tokens(adapter, text)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    eos = eos_token_id(adapter)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = adapter.run_with_hooks(tokens, hooks)[0, -1].float().cpu()
            if temperature == 0:
                token = int(logits.argmax())
            else:
                token = int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator))
            if eos is not None and token == eos:
                break
            new.append(token)
            tokens = torch.cat([tokens, torch.tensor([[token]], device=tokens.device, dtype=tokens.dtype)], dim=1)
    return adapter.tokenizer.decode(new)


def compare_generation(
    adapter: MemoryAdapter,
    text: str,
    edits: Edit | Iterable[Edit],
    *,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
) -> GenerationComparison:
    """:func:`generate` without and with ``edits``, same settings and seed."""
    chosen = validate_edits(adapter, edits)
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    original = generate(adapter, text, **kwargs)
    edited = generate(adapter, text, edits=chosen, **kwargs)
    return GenerationComparison(text, original, edited, chosen)
