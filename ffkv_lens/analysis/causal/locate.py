"""Which memories carry a fact: attribution to log p(target), verified by ablation.

For a prompt whose next token should be the target ``t``, the objective is ``log p(t)`` at the last position,
and each memory ``(layer, key)`` is scored by its coefficient ``m`` at that position:

- ``method="attribution"``: ``m * d log p(t) / d m`` (gradient times activation), every memory of every
  layer from one forward and one backward pass per prompt. A first-order **estimate** of what zeroing the
  memory removes: ``log p(t) - log p(t | m = 0) ~ m * gradient``.
- ``method="integrated_gradients"`` (Dai et al. 2022, knowledge neurons): per layer, the coefficients of all
  its memories at the last position are scaled by ``alpha = k / steps``, ``k = 1..steps``, and
  ``attribution_i = m_i / steps * sum_k d log p(t) / d m_i (alpha_k m)`` (a right Riemann sum of the path
  integral). Completeness: a layer's attributions sum to ``log p(t | alpha = 1) - log p(t | alpha = 0)``,
  up to the Riemann error, which shrinks as ``steps`` grows; the result reports it per prompt and layer.

Several prompts (paraphrases of one fact): a memory's attribution is its mean over the prompts, and it is
**shared** when its attribution reaches ``attribution_threshold`` times the largest attribution of a prompt
on at least ``share_threshold`` of the prompts (the knowledge-neurons recipe; both thresholds are recorded).

``verify=True`` **measures**: each of the top memories is zeroed at the last position alone, then all of them
together (:class:`~ffkv_lens.analysis.interventions.Edit`), and the change of p(t) and of log p(t) is reported
beside the attribution.

Example:
    >>> loc = locate_fact(lens, ["The capital of France is"], " Paris", top=10)  # doctest: +SKIP
    >>> loc.memories[["layer", "key", "attribution", "ablation_delta_p"]].head()  # doctest: +SKIP
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from ffkv_lens.adapters import AdapterLike, MemoryAdapter, as_adapter
from ffkv_lens.analysis.causal.facts import next_token_logprobs, target_token_id
from ffkv_lens.analysis.interventions import Edit, intervene
from ffkv_lens.errors import ConfigError

__all__ = ["METHODS", "OBJECTIVE", "FactLocation", "locate_fact"]

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("attribution", "integrated_gradients")
OBJECTIVE = "log p(target) at the last position; memories scored by their coefficient at that position"


@dataclass(frozen=True)
class FactLocation:
    """Where a fact sits: memories ranked by attribution, with measured ablations.

    Attributes:
        target: The answer text.
        target_token: The measured token (the answer's first token) as decoded.
        target_token_id: Its id.
        prompts: The prompts attributed over.
        memories: The top memories, best first: ``rank, layer, key, attribution`` (mean over prompts),
            ``attribution_min``, ``coefficient`` (mean), ``shared_by`` (prompts over the threshold), ``shared``,
            and with verification ``ablation_delta_p``, ``ablation_delta_logp`` (mean measured change when the
            memory alone is zeroed at the last position) and ``estimate_delta_logp`` (``-attribution``).
        per_prompt: ``prompt, layer, key, coefficient, attribution`` of the top memories on each prompt.
        completeness: Integrated gradients: ``prompt, layer, sum_attribution, objective_change, error`` per
            prompt and layer; ``None`` for ``attribution``.
        verification: ``base_p`` (per prompt), ``joint_delta_p`` / ``joint_delta_logp`` (all top memories zeroed
            together, mean over prompts) and the joint edits; empty without verification.
        settings: Every setting that changes the numbers.
    """

    target: str
    target_token: str
    target_token_id: int
    prompts: tuple[str, ...]
    memories: pd.DataFrame
    per_prompt: pd.DataFrame
    completeness: pd.DataFrame | None
    verification: dict[str, Any]
    settings: dict[str, Any]

    def edits(self, n: int | None = None) -> list[Edit]:
        """``Edit.zero`` of the top ``n`` memories (default all) at every position, one edit per layer."""
        return _zero_edits(self.memories.head(n), positions="all")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (tables as lists of records)."""
        return {
            "target": self.target,
            "target_token": self.target_token,
            "target_token_id": self.target_token_id,
            "prompts": list(self.prompts),
            "memories": self.memories.to_dict(orient="records"),
            "per_prompt": self.per_prompt.to_dict(orient="records"),
            "completeness": None if self.completeness is None else self.completeness.to_dict(orient="records"),
            "verification": self.verification,
            "settings": self.settings,
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=1)


def _zero_edits(memories: pd.DataFrame, *, positions: Any) -> list[Edit]:
    by_layer: dict[int, list[int]] = {}
    for layer, key in zip(memories["layer"].tolist(), memories["key"].tolist(), strict=True):
        by_layer.setdefault(int(layer), []).append(int(key))
    return [Edit.zero(layer, keys, positions=positions) for layer, keys in sorted(by_layer.items())]


def _hook(
    names: dict[str, int], coefficients: dict[int, Tensor], deltas: dict[int, Tensor], alpha: Tensor | None
) -> Any:
    """A hook on ``mlp.hook_post`` adding a zero leaf to the last position's coefficients (scaled by ``alpha``)."""

    def hook(m: Tensor, hook: Any) -> Tensor:
        layer = names[hook.name]
        out = m.clone()
        last = m[:, -1, :]
        coefficients[layer] = last.detach()
        if alpha is not None:
            last = alpha[:, None].to(m.dtype) * last.detach()
        out[:, -1, :] = last + deltas[layer]
        return out

    return hook


def _gradients(
    adapter: MemoryAdapter, tokens: Tensor, target: int, layers: Sequence[int], alpha: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(coefficients, gradients, log p)`` at the last position: ``[rows, layers, d_mlp]`` twice and ``[rows]``.

    ``rows`` is 1, or ``len(alpha)`` when the coefficients of the (single) layer are scaled row by row.
    """
    rows = 1 if alpha is None else len(alpha)
    coefficients: dict[int, Tensor] = {}
    deltas = {layer: torch.zeros(rows, adapter.d_mlp, device=adapter.device, requires_grad=True) for layer in layers}
    names = {adapter.hook_names(layer).coefficients: layer for layer in layers}
    hook = _hook(names, coefficients, deltas, alpha)
    with torch.enable_grad():
        logits = adapter.run_with_hooks(tokens.expand(rows, -1), [(name, hook) for name in names])
        logp = torch.log_softmax(logits[:, -1].float(), dim=-1)[:, target]
        grads = torch.autograd.grad(logp.sum(), [deltas[layer] for layer in layers])
    m = torch.stack([coefficients[layer] for layer in layers], dim=1).float()
    return m, torch.stack([g.float() for g in grads], dim=1), logp.detach()


def _integrated(
    adapter: MemoryAdapter, tokens: Tensor, target: int, layers: Sequence[int], steps: int
) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    """Integrated-gradient attributions ``[layers, d_mlp]``, coefficients and per-layer completeness rows."""
    alpha = torch.arange(steps + 1, dtype=torch.float32, device=adapter.device) / steps
    attributions, coefficients, checks = [], [], []
    for layer in layers:
        m, grads, logp = _gradients(adapter, tokens, target, [layer], alpha)
        full = m[-1, 0]
        attribution = full / steps * grads[1:, 0].sum(0)
        attributions.append(attribution)
        coefficients.append(full)
        change = float(logp[-1] - logp[0])
        total = float(attribution.double().sum())
        checks.append({"layer": layer, "sum_attribution": total, "objective_change": change, "error": total - change})
    return torch.stack(attributions), torch.stack(coefficients), checks


def _check_args(adapter: MemoryAdapter, prompts: Sequence[str], method: str, top: int, steps: int) -> list[str]:
    if not adapter.causal:
        raise ConfigError(f"{adapter.architecture} is not a causal LM; locate_fact attributes a next-token prediction.")
    chosen = [prompts] if isinstance(prompts, str) else list(prompts)
    if not chosen or not all(isinstance(p, str) and p for p in chosen):
        raise ConfigError(f"prompts={prompts!r}; pass a non-empty list of non-empty prompts.")
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not a method; pass one of {list(METHODS)}.")
    if not isinstance(top, int) or top < 1:
        raise ConfigError(f"top={top!r}; pass a positive number of memories.")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r}; pass a positive number of integration steps.")
    return chosen


def _target_id(adapter: MemoryAdapter, prompts: Sequence[str], target: str) -> int:
    ids = {target_token_id(adapter, prompt, target) for prompt in prompts}
    if len(ids) > 1:
        raise ConfigError(
            f"target {target!r} starts with different tokens after different prompts ({sorted(ids)}); end every "
            "prompt the same way (all with or all without a trailing space)."
        )
    return ids.pop()


def _rank(
    attributions: Tensor, coefficients: Tensor, layers: Sequence[int], top: int, thresholds: tuple[float, float]
) -> pd.DataFrame:
    """The top memories by mean attribution over prompts (``attributions``: ``[prompts, layers, d_mlp]``)."""
    attribution_threshold, share_threshold = thresholds
    n_prompts, n_layers, d_mlp = attributions.shape
    best = attributions.reshape(n_prompts, -1).max(dim=1).values.clamp_min(0)
    above = attributions >= attribution_threshold * best[:, None, None]
    above &= attributions > 0
    shared_by = above.sum(0)
    mean = attributions.mean(0).reshape(-1)
    order = torch.argsort(mean, descending=True, stable=True)[: min(top, mean.numel())]
    layer_index, key = order // d_mlp, order % d_mlp
    return pd.DataFrame(
        {
            "rank": range(1, len(order) + 1),
            "layer": [int(layers[i]) for i in layer_index.tolist()],
            "key": key.tolist(),
            "attribution": mean[order].tolist(),
            "attribution_min": attributions.min(0).values.reshape(-1)[order].tolist(),
            "coefficient": coefficients.mean(0).reshape(-1)[order].tolist(),
            "shared_by": shared_by.reshape(-1)[order].tolist(),
            "shared": (shared_by.reshape(-1)[order] >= share_threshold * n_prompts).tolist(),
        }
    )


def _p_target(adapter: MemoryAdapter, tokens: Tensor, target: int, edits: Sequence[Edit]) -> float:
    with intervene(adapter, edits):
        return float(next_token_logprobs(adapter, tokens)[0, target].exp())


def _verify(
    adapter: MemoryAdapter, all_tokens: Sequence[Tensor], target: int, memories: pd.DataFrame
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Zero each memory at the last position alone, then all together; the measured changes of p and log p."""
    base = torch.tensor([_p_target(adapter, tokens, target, []) for tokens in all_tokens], dtype=torch.float64)

    def change(edits: Sequence[Edit]) -> tuple[float, float]:
        after = torch.tensor([_p_target(adapter, t, target, edits) for t in all_tokens], dtype=torch.float64)
        return float((after - base).mean()), float((after.log() - base.log()).mean())

    single = [change(_zero_edits(memories.iloc[[i]], positions="last")) for i in range(len(memories))]
    memories = memories.assign(
        ablation_delta_p=[s[0] for s in single],
        ablation_delta_logp=[s[1] for s in single],
        estimate_delta_logp=-memories["attribution"],
    )
    joint = _zero_edits(memories, positions="last")
    joint_p, joint_logp = change(joint)
    summary = {
        "base_p": base.tolist(),
        "joint_delta_p": joint_p,
        "joint_delta_logp": joint_logp,
        "joint_estimate_delta_logp": -float(memories["attribution"].sum()),
        "joint_edits": [edit.to_dict() for edit in joint],
    }
    return memories, summary


def locate_fact(
    model: AdapterLike,
    prompts: str | Sequence[str],
    target: str,
    *,
    method: str = "attribution",
    top: int = 20,
    steps: int = 20,
    layers: int | Sequence[int] | None = None,
    verify: bool = True,
    share_threshold: float = 0.5,
    attribution_threshold: float = 0.3,
) -> FactLocation:
    """Rank the memories that carry ``target`` after ``prompts`` (see the module docstring).

    Args:
        model: A lens, adapter or TransformerLens model (causal LMs only).
        prompts: One prompt or several paraphrases of one fact.
        target: The answer; its first token is measured (:func:`~ffkv_lens.analysis.causal.facts.answer_text`).
        method: ``"attribution"`` (coefficient x gradient) or ``"integrated_gradients"``.
        top: Memories kept (and verified).
        steps: Integration steps of ``integrated_gradients``.
        layers: Layers to attribute (default all).
        verify: Measure each top memory's ablation, and all of them together.
        share_threshold: Share of the prompts on which a memory must pass ``attribution_threshold`` to be shared.
        attribution_threshold: Share of a prompt's largest attribution a memory must reach on that prompt.

    Returns:
        A :class:`FactLocation`.

    Raises:
        ConfigError: Bad arguments, a non-causal model, or a target whose first token depends on the prompt.
    """
    adapter = as_adapter(model)
    chosen = _check_args(adapter, prompts, method, top, steps)
    picked = adapter.check_layers(layers)
    target_id = _target_id(adapter, chosen, target)
    all_tokens = [adapter.to_tokens(prompt) for prompt in chosen]
    attributions, coefficients, checks = [], [], []
    for index, tokens in enumerate(all_tokens):
        if method == "attribution":
            m, grads, _ = _gradients(adapter, tokens, target_id, picked)
            attributions.append(m[0] * grads[0])
            coefficients.append(m[0])
        else:
            attribution, m, rows = _integrated(adapter, tokens, target_id, picked, steps)
            attributions.append(attribution)
            coefficients.append(m)
            checks += [{"prompt": index, **row} for row in rows]
    stacked = torch.stack(attributions)
    memories = _rank(stacked, torch.stack(coefficients), picked, top, (attribution_threshold, share_threshold))
    per_prompt = _per_prompt(memories, stacked, torch.stack(coefficients), picked)
    verification: dict[str, Any] = {}
    if verify:
        memories, verification = _verify(adapter, all_tokens, target_id, memories)
    completeness = pd.DataFrame(checks) if checks else None
    settings = _settings(adapter, method, top, steps, picked, (share_threshold, attribution_threshold), completeness)
    log.info(
        "located %r over %d prompts with %s: top memory %s", target, len(chosen), method, memories.iloc[0].to_dict()
    )
    return FactLocation(
        target=target,
        target_token=adapter.tokenizer.decode([target_id]),
        target_token_id=target_id,
        prompts=tuple(chosen),
        memories=memories,
        per_prompt=per_prompt,
        completeness=completeness,
        verification=verification,
        settings=settings,
    )


def _per_prompt(memories: pd.DataFrame, attributions: Tensor, coefficients: Tensor, layers: Sequence[int]) -> Any:
    index = {layer: i for i, layer in enumerate(layers)}
    rows = []
    for prompt in range(attributions.shape[0]):
        for layer, key in zip(memories["layer"].tolist(), memories["key"].tolist(), strict=True):
            li = index[layer]
            rows.append(
                {
                    "prompt": prompt,
                    "layer": layer,
                    "key": key,
                    "coefficient": float(coefficients[prompt, li, key]),
                    "attribution": float(attributions[prompt, li, key]),
                }
            )
    return pd.DataFrame(rows)


def _settings(
    adapter: MemoryAdapter,
    method: str,
    top: int,
    steps: int,
    layers: Sequence[int],
    thresholds: tuple[float, float],
    completeness: pd.DataFrame | None,
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "method": method,
        "objective": OBJECTIVE,
        "top": top,
        "steps": steps if method == "integrated_gradients" else None,
        "riemann_sum": "right: alpha = k / steps, k = 1..steps" if method == "integrated_gradients" else None,
        "layers": list(layers),
        "share_threshold": thresholds[0],
        "attribution_threshold": thresholds[1],
        "ablation": "zero the memory's coefficient at the last position (mlp.hook_post)",
        "model": adapter.model_name,
        "architecture": adapter.architecture,
    }
    if completeness is not None:
        settings["completeness_max_abs_error"] = float(completeness["error"].abs().max())
    return settings
