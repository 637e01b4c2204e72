"""The weight-level twin of ``zero`` and ``scale`` edits at all positions.

Scaling memory i's coefficient by s at every position is the same map as scaling row i of the
FFN's output weights ``W_out`` by s (on Gemma too: the post-FFN norm acts on ``m @ W_out``, and
its gain, folded into :meth:`~ffkv_lens.adapters.MemoryAdapter.values`, is left alone).
:func:`edited_values` applies that change for the duration of a ``with`` block and restores the
weights bit for bit afterwards, also after an exception. The logits equal those of the hook edit
up to float rounding (tested to 1e-5 relative in fp32).

Example:
    >>> with lens.edited_values([Edit.zero(20, [7]), Edit.scale(21, 3, 2.0)]):  # doctest: +SKIP
    ...     logits = model(tokens)
"""

import contextlib
from collections.abc import Iterable, Iterator

from ffkv_lens.adapters.base import MemoryAdapter
from ffkv_lens.analysis.interventions.edits import Edit, validate_edits
from ffkv_lens.errors import ConfigError

__all__ = ["edited_values", "value_factors"]


def value_factors(adapter: MemoryAdapter, edits: Edit | Iterable[Edit]) -> dict[int, dict[int, float]]:
    """``{layer: {memory: factor}}`` of ``zero`` (0) and ``scale`` (s) edits at all positions.

    Raises:
        ConfigError: For another operation or other positions (they have no weight-level form).
    """
    factors: dict[int, dict[int, float]] = {}
    for edit in validate_edits(adapter, edits):
        if edit.op not in ("zero", "scale") or edit.positions != "all":
            raise ConfigError(
                f"{edit.describe()}: edited_values() takes zero and scale edits at all positions; "
                "use intervene() (hooks) for other operations or positions."
            )
        values = (0.0,) * len(edit.keys) if edit.value is None else edit.value
        factors.setdefault(edit.layer, {}).update(zip(edit.keys, values, strict=True))
    return factors


@contextlib.contextmanager
def edited_values(adapter: MemoryAdapter, edits: Edit | Iterable[Edit]) -> Iterator[None]:
    """Within the block, ``zero``/``scale`` edits are part of the model's ``W_out`` (restored exactly on exit)."""
    with adapter.scaled_values(value_factors(adapter, edits)):
        yield
