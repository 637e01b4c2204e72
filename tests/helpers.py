"""One numeric comparison helper for every test (SAELens style)."""

import torch
from torch import Tensor


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_close(actual: Tensor, expected: Tensor, *, rel: float, what: str = "") -> None:
    """Assert the relative Frobenius error is at most ``rel``, printing the values if not."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    diff = max_abs(actual.double() - expected.double())
    assert err <= rel, f"{what}: relative error {err:.3e} > {rel:.1e}; max abs diff {diff:.3e}"


def max_abs(t: Tensor) -> float:
    """Largest absolute entry (for messages)."""
    return float(torch.as_tensor(t).abs().max())
