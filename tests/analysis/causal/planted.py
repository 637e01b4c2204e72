"""A tiny model with one planted memory: a key that fires on a trigger token and a value that writes a target token.

``planted_model(tiny_folder, "llama")`` boots a fresh tiny model (tests/factories.py) and rewrites one memory
``(layer, key)`` in place:

- the key (gate and up key on gated MLPs, key and bias otherwise) is fitted by least squares on the FFN inputs
  of :data:`tests.factories.TEXT` and the prompt so that its pre-activation is ``>= +margin`` at every position
  of the trigger token and ``<= -margin`` everywhere else: the coefficient is large on the trigger and near zero
  elsewhere (``activation(-margin)`` is about ``-margin * exp(-margin)``);
- the value is the target token's centred unembedding direction (with the final norm's gain), scaled by
  bisection to the smallest norm at which the target's logit leads the runner-up by ``lead_share`` of the lead
  a dominating value gives: the model predicts the target on the prompt without a saturated softmax (tiny
  random models have small unembeddings, so p(target) stays far below 1 and gradients do not vanish).

The model is booted fresh on each call, so the shared session fixtures are never mutated.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ffkv_lens import MemoryLens
from tests.conftest import boot
from tests.factories import TEXT

__all__ = ["Planted", "planted_model"]


@dataclass
class Planted:
    """A booted tiny model with one planted memory.

    Attributes:
        lens: The lens on the planted model (``lens.adapter.model`` is the bridge).
        layer: Layer of the planted memory.
        key: Index of the planted memory.
        target_token_id: Token its value writes.
        trigger_token_id: Token its key fires on.
        prompt: Text ending in the trigger token, on which the model predicts the target.
        tokens: ``prompt`` tokenised (with BOS as the model expects), ``[1, pos]``.
        coefficient: The planted memory's coefficient at the prompt's last position.
        target_prob: p(target) at the prompt's last position.
        margin: The fitted key's smallest distance of a pre-activation from zero on the fitting texts.
    """

    lens: MemoryLens
    layer: int
    key: int
    target_token_id: int
    trigger_token_id: int
    prompt: str
    tokens: Tensor
    coefficient: float
    target_prob: float
    margin: float


def _module(mlp: Any, name: str) -> torch.nn.Module:
    part = getattr(mlp, name)
    return getattr(part, "original_component", part)


def _set_row(module: torch.nn.Module, key: int, row: Tensor, *, output: bool) -> None:
    """Write memory ``key``'s row (``output``: its value) into a Linear ``[out, in]`` or Conv1D ``[in, out]``."""
    conv1d = type(module).__name__ == "Conv1D"
    with torch.no_grad():
        if conv1d != output:
            module.weight[:, key] = row
        else:
            module.weight[key, :] = row


def _ffn_inputs(lens: MemoryLens, layer: int, texts: list[str]) -> tuple[Tensor, Tensor]:
    names = lens.hook_names(layer)
    xs, ids = [], []
    for text in texts:
        tokens = lens.adapter.to_tokens(text)
        acts = lens.adapter.record(tokens, [names.ffn_input], stop_after=names.ffn_input)
        xs.append(acts[names.ffn_input][0])
        ids.append(tokens[0])
    return torch.cat(xs), torch.cat(ids)


def _fit_key(x: Tensor, positive: Tensor, with_bias: bool, margin: float) -> tuple[Tensor, float, float]:
    """A key (and bias) whose pre-activation is >= +margin on ``positive`` rows and <= -margin elsewhere.

    A soft-margin linear separator (squared hinge, class-balanced, small L2 penalty, so the key stays short and
    the coefficient a smooth function of the input), scaled so that its smallest distance from zero is ``margin``.
    """
    design = (torch.cat([x, torch.ones(len(x), 1)], dim=1) if with_bias else x).double()
    sign = positive.double() * 2 - 1
    weight = torch.where(positive, 0.5 / positive.sum(), 0.5 / (~positive).sum()).double()
    solution = torch.zeros(design.shape[1], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([solution], lr=0.05)
    for _ in range(3000):
        violation = torch.relu(1 - sign * (design @ solution))
        optimiser.zero_grad()
        ((weight * violation.square()).sum() + 1e-4 * solution.square().sum()).backward()
        optimiser.step()
    solution = solution.detach()
    pre = design @ solution
    gap = float(torch.minimum(pre[positive].min(), -pre[~positive].max()))
    if gap <= 0:
        raise RuntimeError(f"the trigger token is not linearly separable at this layer (gap {gap:.3g}); pick another")
    solution = solution * (margin / gap)
    weight, bias = (solution[:-1], float(solution[-1])) if with_bias else (solution, 0.0)
    return weight.float(), bias, margin


def _value_direction(lens: MemoryLens, target: int) -> Tensor:
    w_u = lens.adapter.unembedding().detach()
    direction = w_u[:, target] - w_u.mean(dim=1)
    gain = lens.adapter.final_norm_gain()
    if gain is not None:
        direction = direction * gain.detach()
    if lens.adapter.final_norm_centres:
        direction = direction - direction.mean()
    return direction / direction.norm()


def _lead(lens: MemoryLens, tokens: Tensor, target: int) -> float:
    """Logit of ``target`` minus the largest other logit at the last position."""
    with torch.no_grad():
        logits = lens.adapter.model(tokens)[0, -1].double()
    return float(logits[target] - torch.cat([logits[:target], logits[target + 1 :]]).max())


def _target_prob(lens: MemoryLens, tokens: Tensor, target: int) -> float:
    with torch.no_grad():
        logits = lens.adapter.model(tokens)
    return float(torch.softmax(logits[0, -1].double(), -1)[target])


def _scale_value(
    lens: MemoryLens, out: torch.nn.Module, key: int, direction: Tensor, planted: tuple[Tensor, int, float]
):
    """Bisect the value's norm to the smallest at which the target leads by ``share`` of its asymptotic lead.

    The asymptotic lead is the lead of a value so large that it dominates the residual stream (tiny random
    models have small unembeddings, so a planted memory makes the target the prediction, not a certainty).
    """
    tokens, target, share = planted
    _set_row(out, key, direction * 1e6, output=True)
    goal = share * _lead(lens, tokens, target)
    if goal <= 0:
        raise RuntimeError("the value direction does not make the target the prediction; pick another target")
    low, high = 0.0, 1e6
    for _ in range(60):
        mid = (low * high) ** 0.5 if low > 0 else high / 1e3
        _set_row(out, key, direction * mid, output=True)
        low, high = (mid, high) if _lead(lens, tokens, target) < goal else (low, mid)
        if high / max(low, 1e-12) < 1.01:
            break
    _set_row(out, key, direction * high, output=True)


def planted_model(
    tiny_folder_or_path: Callable[[str], Path] | Path | str,
    family: str = "llama",
    *,
    layer: int = 1,
    key: int = 5,
    prompt: str = "The capital of France is",
    target: str = " fox",
    lead_share: float = 0.5,
    margin: float = 8.0,
) -> Planted:
    """Boot a fresh tiny model of ``family`` and plant one memory (see the module docstring).

    Args:
        tiny_folder_or_path: The ``tiny_folder`` fixture (called with ``family``) or a saved tiny model folder.
        family: A family of tests/factories.py. Not ``bert`` (the planted fact is a next-token prediction) and not
            ``gemma2``/``gemma3`` (their post-FFN norm caps the FFN output, so no value can dominate the residual).
        layer: Layer of the planted memory.
        key: Index of the planted memory.
        prompt: Text whose last token is the trigger.
        target: Text whose first token is the target.
        lead_share: The value is scaled to the smallest norm at which the target's logit leads the runner-up by
            this share of the lead a dominating value would give.
        margin: Pre-activation margin of the key around zero.

    Returns:
        A :class:`Planted`.
    """
    folder = tiny_folder_or_path(family) if callable(tiny_folder_or_path) else Path(tiny_folder_or_path)
    lens = MemoryLens(boot(folder))
    tokenizer = lens.adapter.tokenizer
    tokens = lens.adapter.to_tokens(prompt)
    trigger = int(tokens[0, -1])
    target_id = int(tokenizer.encode(target, add_special_tokens=False)[0])
    texts = [s.strip() + "." for s in TEXT.split(".") if s.strip()] + [prompt]
    x, ids = _ffn_inputs(lens, layer, texts)
    mlp = lens.adapter.model.blocks[layer].mlp
    key_names = ("gate", "in") if lens.gated else ("in",)
    bias_module = _module(mlp, key_names[0])
    with_bias = getattr(bias_module, "bias", None) is not None
    weight, bias, gap = _fit_key(x, ids == trigger, with_bias, margin)
    for name in key_names:
        _set_row(_module(mlp, name), key, weight, output=False)
    if with_bias:
        with torch.no_grad():
            bias_module.bias[key] = bias
    out = _module(mlp, "out")
    _scale_value(lens, out, key, _value_direction(lens, target_id), (tokens, target_id, lead_share))
    coefficient = float(lens.coefficients(tokens, layers=layer)[layer][0, -1, key])
    return Planted(
        lens=lens,
        layer=layer,
        key=key,
        target_token_id=target_id,
        trigger_token_id=trigger,
        prompt=prompt,
        tokens=tokens,
        coefficient=coefficient,
        target_prob=_target_prob(lens, tokens, target_id),
        margin=gap,
    )
