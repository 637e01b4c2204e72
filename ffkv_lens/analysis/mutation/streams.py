"""Every random stream of the mutation test, in one place.

Each quantity the test draws has its own stream, seeded by ``[seed, <scope>, <stream>]`` so that
the draws are independent of each other and of which layers are tested:

- keys sampled per layer: ``default_rng([seed, layer, KEYS_STREAM])`` (:func:`key_rng`);
- the token a ``random`` mutation removes: one permutation per unit,
  ``default_rng([seed, unit_id, TOKENS_STREAM])`` (:func:`unit_order`, :func:`random_token_index`);
- the bootstrap over keys per layer: ``default_rng([seed, layer, BOOTSTRAP_STREAM])`` (:func:`bootstrap_rng`).
"""

import numpy as np

__all__ = [
    "BOOTSTRAP_STREAM",
    "KEYS_STREAM",
    "TOKENS_STREAM",
    "bootstrap_rng",
    "key_rng",
    "random_token_index",
    "unit_order",
]

KEYS_STREAM, TOKENS_STREAM, BOOTSTRAP_STREAM = 0, 1, 2


def key_rng(seed: int, layer: int) -> np.random.Generator:
    """The generator that samples a layer's keys."""
    return np.random.default_rng([seed, layer, KEYS_STREAM])


def bootstrap_rng(seed: int, layer: int) -> np.random.Generator:
    """The generator of a layer's bootstrap resamples (over keys)."""
    return np.random.default_rng([seed, layer, BOOTSTRAP_STREAM])


def random_token_index(order: np.ndarray, n: int) -> int:
    """The own token a ``random`` mutation of an ``n``-token prefix removes.

    ``order`` is the unit's seeded permutation of ``range(len(unit))``; the index removed is its
    first entry below ``n``. For a uniform permutation this is uniform on ``[0, n)`` (by symmetry,
    each of ``0 .. n - 1`` is equally likely to come first among them), and all prefixes of a unit
    share few distinct removals (the running minima of the permutation, about ``ln(len(unit))``).

    Args:
        order: A permutation of ``0 .. L - 1`` with ``L >= n``.
        n: Own tokens of the prefix, at least 1.

    Returns:
        The removed own-token index, in ``[0, n)``.
    """
    return int(order[int(np.argmax(order < n))])


def unit_order(seed: int, unit_id: int, n_tokens: int) -> np.ndarray:
    """The unit's seeded permutation of its own token indices (independent of layer and key)."""
    return np.random.default_rng([seed, unit_id, TOKENS_STREAM]).permutation(n_tokens)
