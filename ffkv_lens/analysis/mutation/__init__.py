"""The mutation test: shallow versus semantic keys (Geva et al. 2021, section 3.2, Fig 3).

For a seeded sample of keys per layer and each key's top trigger examples (best first), the
example's prefix (the tokens the model saw up to and including the peak, BOS included when the
atlas was searched with one) is mutated three ways: remove its first own token, its last token,
or a random own token (never the BOS). The key's coefficient at the last position of each
mutated prefix is compared with the coefficient at the last position of the original prefix,
recomputed in the same run: ``change = (m_mut - m_orig) / |m_orig|``. Removing the last token
hurts shallow (n-gram, last-token) keys most; the paper finds this in its lower layers.

Cost (:mod:`ffkv_lens.analysis.mutation.runs`): on causal models every prefix is read from one of
a few *variant sequences* per unit (the unit, without its first token, without its random token),
each run once for every key and layer; bidirectional models run each prefix alone, per layer.
See docs/mutation.md for the exact definitions and measured numbers.

Example:
    >>> import ffkv_lens as fk  # doctest: +SKIP
    >>> lens = fk.MemoryLens(fk.load_model("smollm2-135m"))  # doctest: +SKIP
    >>> atlas = lens.search_triggers(fk.Corpus.default(), max_tokens=20_000)  # doctest: +SKIP
    >>> result = mutation_test(lens, atlas, keys_per_layer=100, examples=50)  # doctest: +SKIP
    >>> result.per_layer[["layer", "change_first", "change_last", "change_random"]]  # doctest: +SKIP

The sub-package, by concern: :mod:`.config` (settings, definitions, result), :mod:`.streams` (every
random stream), :mod:`.examples` (sampled keys and their examples), :mod:`.batching` (padding and
forward-pass splits), :mod:`.runs` (the two strategies), :mod:`.test` (:func:`mutation_test` and its tables).
"""

from ffkv_lens.analysis.mutation.config import (
    DEFINITIONS,
    MUTATIONS,
    STRATEGIES,
    MutationConfig,
    MutationResult,
)
from ffkv_lens.analysis.mutation.test import mutation_test

__all__ = ["DEFINITIONS", "MUTATIONS", "STRATEGIES", "MutationConfig", "MutationResult", "mutation_test"]
