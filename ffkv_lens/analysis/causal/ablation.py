"""Batched ablations: each row of a forward pass zeroes its own memory at its own position.

A *pair* is (prefix, key): the prefix's tokens (BOS first when the atlas was searched with one)
end at the position ablated, and every effect is read at that last position. For one layer,

- :func:`clean_runs` runs each distinct prefix once (right-padded, length-sorted batches) and keeps,
  at its last position, the layer's coefficients, the post-FFN norm scale (Gemma), the final
  residual and the final norm's scale;
- :func:`ablate` runs every pair as one row of a batch whose hook on ``mlp.hook_post`` zeroes
  row ``b``'s own key at row ``b``'s own last position (a per-row index), and derives the direct
  effects from the clean runs without any forward pass;
- :func:`ablate_one_by_one` is the reference: one forward pass per pair, the ablation made by
  :class:`~ffkv_lens.analysis.interventions.Edit` under
  :func:`~ffkv_lens.analysis.interventions.intervene`, and the frozen direct effect taken from
  :func:`~ffkv_lens.analysis.contributions.contributions`.

Effects are ``clean - ablated`` (positive: the memory promotes the token):

- ``total``: on log p, the ablation flowing through every later layer;
- ``direct``: on log p, only the memory's term ``(m / s_post) v`` removed from the final residual,
  the final norm recomputed on the changed residual (the readout as the model computes it);
- ``direct_logit_frozen``: on the logit centred over the vocabulary, the final norm's scale frozen
  at its clean value and before any soft-cap: this is the memory's
  :func:`~ffkv_lens.analysis.contributions.contributions` entry, by definition.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ffkv_lens.adapters import MemoryAdapter
from ffkv_lens.analysis.mutation.batching import batch_bounds, pad_token, padded
from ffkv_lens.errors import ConfigError, HookNotFiredError

__all__ = ["Ablations", "CleanRuns", "ablate", "ablate_one_by_one", "clean_runs"]

Prefix = tuple[int, ...]
READOUT_ROWS = 64  # residual rows read out at once: 64 x d_vocab float64 logits (128 MiB at Gemma's 262k tokens)


@dataclass(frozen=True)
class CleanRuns:
    """What the clean pass of each distinct prefix leaves at its last position (one layer).

    Attributes:
        coefficients: The layer's memory coefficients ``[prefixes, d_mlp]``.
        post_scale: The layer's post-FFN norm scale ``[prefixes]`` (Gemma), else None.
        resid: The final residual stream ``[prefixes, d_model]``.
        norm_scale: The final norm's scale ``[prefixes]``.
    """

    coefficients: Float[Tensor, "prefixes d_mlp"]
    post_scale: Float[Tensor, " prefixes"] | None
    resid: Float[Tensor, "prefixes d_model"]
    norm_scale: Float[Tensor, " prefixes"]


@dataclass(frozen=True)
class Ablations:
    """Per pair: its memory's clean coefficient, the clean log p and the effects of ablating it.

    Attributes:
        coefficient: The memory's clean coefficient at the ablated position ``[pairs]``.
        clean_logp: Clean log p of each target token ``[pairs, targets]``.
        total: Total effect on log p, ``clean - ablated`` ``[pairs, targets]``.
        direct: Direct effect on log p, final norm recomputed ``[pairs, targets]``.
        direct_logit_frozen: Direct effect on the centred logit, final norm scale frozen ``[pairs, targets]``.
        seconds: Wall time of the forward passes (clean and ablated).
    """

    coefficient: Float[Tensor, " pairs"]
    clean_logp: Float[Tensor, "pairs targets"]
    total: Float[Tensor, "pairs targets"]
    direct: Float[Tensor, "pairs targets"]
    direct_logit_frozen: Float[Tensor, "pairs targets"]
    seconds: float


def check_causal(adapter: MemoryAdapter) -> None:
    """Ablations at a prefix's last position read a next-token prediction: causal decoders only."""
    if not adapter.causal or adapter.spec.readout != "unembed":
        raise ConfigError(
            f"{adapter.architecture} is not a causal language model with an unembedding; causal agreement "
            "reads next-token predictions of trigger prefixes. Use a decoder model (GPT-2, Llama, Gemma, ...)."
        )


def _batches(prefixes: Sequence[Prefix], batch_tokens: int) -> list[list[int]]:
    """Indices of ``prefixes`` in length-sorted batches of at most ``batch_tokens`` padded tokens."""
    order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]))
    bounds = batch_bounds([len(prefixes[i]) for i in order], batch_tokens)
    return [order[start:end] for start, end in bounds]


def _last(tensor: Tensor, last: Tensor) -> Tensor:
    return tensor[torch.arange(tensor.shape[0], device=tensor.device), last.to(tensor.device)]


def clean_runs(
    adapter: MemoryAdapter, layer: int, prefixes: Sequence[Prefix], *, batch_tokens: int = 2048
) -> CleanRuns:
    """One clean forward pass per prefix (batched), read at each prefix's last real position."""
    hooks, readout = adapter.hook_names(layer), adapter.readout_hooks()
    names = [hooks.coefficients, readout.resid, readout.norm_scale]
    names += [hooks.post_ffn_scale] if hooks.post_ffn_scale is not None else []
    parts: dict[str, list[Tensor]] = {name: [] for name in names}
    order: list[int] = []
    pad, dev = pad_token(adapter), adapter.device
    for rows in _batches(prefixes, batch_tokens):
        tokens, mask = padded([prefixes[i] for i in rows], pad)
        last = mask.sum(1) - 1
        with torch.no_grad():
            acts = adapter.record(tokens.to(dev), names, attention_mask=mask.to(dev), stop_after=readout.norm_scale)
        for name in names:
            parts[name].append(_last(acts[name], last).reshape(len(rows), -1).double().cpu())
        order += rows
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.as_tensor(order, dtype=torch.long)] = torch.arange(len(order))
    joined = {name: torch.cat(parts[name])[back] for name in names} if order else {}
    if not order:
        raise ConfigError("clean_runs() got no prefix; pass at least one token sequence.")
    post = joined[hooks.post_ffn_scale][:, 0] if hooks.post_ffn_scale is not None else None
    return CleanRuns(joined[hooks.coefficients], post, joined[readout.resid], joined[readout.norm_scale][:, 0])


def _logp(adapter: MemoryAdapter, resid: Tensor, targets: Tensor, chunk: int = READOUT_ROWS) -> Tensor:
    """Log p of ``targets [rows, n]`` from final residuals ``[rows, d_model]`` (the model's readout), in row chunks."""
    out = []
    dtype = adapter.unembedding().dtype
    for start in range(0, resid.shape[0], chunk):
        with torch.no_grad():
            logits = adapter.readout(resid[start : start + chunk].to(adapter.device, dtype)).double()
        out.append(logits.log_softmax(-1).gather(1, targets[start : start + chunk].to(logits.device)).cpu())
    return torch.cat(out) if out else torch.zeros(targets.shape, dtype=torch.float64)


def _frozen(adapter: MemoryAdapter, layer: int, m: Tensor, scale: Tensor, keys: Tensor, targets: Tensor) -> Tensor:
    """``(m / s_post) * value_logits[key, token] / s_final`` per pair and target (``contributions``)."""
    uniq_keys, key_row = torch.unique(keys, return_inverse=True)
    uniq_tok, tok_col = torch.unique(targets, return_inverse=True)
    with torch.no_grad():
        table = adapter.value_token_logits(layer, uniq_tok, uniq_keys).double().cpu()
    return m[:, None] * table[key_row[:, None], tok_col] / scale[:, None]


def _term(adapter: MemoryAdapter, layer: int, m: Tensor, post: Tensor | None, keys: Tensor) -> Tensor:
    """Each pair's memory term ``(m / s_post) v`` in the residual stream ``[pairs, d_model]``."""
    values = adapter.values(layer).detach().double().cpu()[keys]
    return (m / (post if post is not None else 1.0))[:, None] * values


def _direct(
    adapter: MemoryAdapter, layer: int, clean: CleanRuns, pair_prefix: Tensor, pair_key: Tensor, targets: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Coefficient, clean log p, direct effect (norm recomputed) and frozen direct logit effect per pair."""
    m = clean.coefficients[pair_prefix, pair_key]
    post = clean.post_scale[pair_prefix] if clean.post_scale is not None else None
    resid = clean.resid[pair_prefix]
    clean_logp = _logp(adapter, resid, targets)
    direct = clean_logp - _logp(adapter, resid - _term(adapter, layer, m, post, pair_key), targets)
    scale = clean.norm_scale[pair_prefix] * (post if post is not None else 1.0)
    return m, clean_logp, direct, _frozen(adapter, layer, m, scale, pair_key, targets)


def _ablation_hook(last: Tensor, keys: Tensor) -> Any:
    def zero(m: Tensor, hook: Any) -> Tensor:
        out = m.clone()
        out[torch.arange(out.shape[0], device=out.device), last.to(out.device), keys.to(out.device)] = 0
        return out

    return zero


def _ablated_resid(adapter: MemoryAdapter, layer: int, rows: list[Prefix], keys: Tensor) -> Tensor:
    """One forward pass of right-padded ``rows``, row b zeroing ``keys[b]`` at its last position: final residuals."""
    tokens, mask = padded(rows, pad_token(adapter))
    last = mask.sum(1) - 1
    readout, dev = adapter.readout_hooks(), adapter.device
    keep: dict[str, Tensor] = {}

    def read(resid: Tensor, hook: Any) -> None:
        keep["resid"] = _last(resid.detach(), last).double().cpu()

    with torch.no_grad():
        adapter.run_with_hooks(
            tokens.to(dev),
            [(adapter.hook_names(layer).coefficients, _ablation_hook(last, keys)), (readout.resid, read)],
            attention_mask=mask.to(dev),
            stop_after=readout.resid,
        )
    if "resid" not in keep:
        raise HookNotFiredError(f"The hook {readout.resid!r} did not fire; the adapter's readout hooks are wrong.")
    return keep["resid"]


def _check_pairs(n_prefixes: int, pair_prefix: Tensor, pair_key: Tensor, targets: Tensor, d_mlp: int) -> None:
    n = pair_prefix.numel()
    if pair_key.shape != (n,) or targets.ndim != 2 or targets.shape[0] != n:
        raise ConfigError(
            f"pairs: prefix index {tuple(pair_prefix.shape)}, keys {tuple(pair_key.shape)}, targets "
            f"{tuple(targets.shape)}; pass [pairs], [pairs] and [pairs, n_targets]."
        )
    if n and (int(pair_prefix.min()) < 0 or int(pair_prefix.max()) >= n_prefixes):
        raise ConfigError(f"pairs name prefixes outside [0, {n_prefixes}); index the prefixes passed.")
    if n and (int(pair_key.min()) < 0 or int(pair_key.max()) >= d_mlp):
        raise ConfigError(f"pairs name keys outside [0, {d_mlp}) of the layer.")


def ablate(
    adapter: MemoryAdapter,
    layer: int,
    prefixes: Sequence[Prefix],
    pair_prefix: Int[Tensor, " pairs"],
    pair_key: Int[Tensor, " pairs"],
    targets: Int[Tensor, "pairs targets"],
    *,
    clean: CleanRuns | None = None,
    batch_tokens: int = 2048,
) -> Ablations:
    """Ablate every pair's memory at its prefix's last position, many pairs per forward pass.

    Args:
        adapter: The model.
        layer: The layer of every ablated memory.
        prefixes: Distinct token sequences; each ends at the position ablated and read.
        pair_prefix: The prefix of each pair (an index into ``prefixes``).
        pair_key: The memory each pair zeroes.
        targets: Token ids whose log p each pair measures.
        clean: The prefixes' :func:`clean_runs` (computed if None).
        batch_tokens: Padded tokens per forward pass (speed and memory only).

    Returns:
        The :class:`Ablations` of the pairs, in their order.
    """
    check_causal(adapter)
    _check_pairs(len(prefixes), pair_prefix, pair_key, targets, adapter.d_mlp)
    start = time.perf_counter()
    clean = clean if clean is not None else clean_runs(adapter, layer, prefixes, batch_tokens=batch_tokens)
    m, clean_logp, direct, frozen = _direct(adapter, layer, clean, pair_prefix, pair_key, targets)
    rows = [tuple(prefixes[int(i)]) for i in pair_prefix.tolist()]
    ablated = torch.zeros(targets.shape, dtype=torch.float64)
    for batch in _batches(rows, batch_tokens):
        resid = _ablated_resid(adapter, layer, [rows[i] for i in batch], pair_key[batch])
        ablated[batch] = _logp(adapter, resid, targets[batch])
    seconds = time.perf_counter() - start
    return Ablations(m, clean_logp, clean_logp - ablated, direct, frozen, seconds)


def _clean_alone(adapter: MemoryAdapter, layer: int, tokens: Tensor) -> tuple[Tensor, CleanRuns]:
    """One clean forward pass of one prefix: the model's own last-position log p and what :class:`CleanRuns` keeps."""
    hooks, readout = adapter.hook_names(layer), adapter.readout_hooks()
    names = [n for n in (hooks.coefficients, readout.resid, readout.norm_scale, hooks.post_ffn_scale) if n]
    acts: dict[str, Tensor] = {}

    def keep(tensor: Tensor, hook: Any) -> None:
        acts[hook.name] = tensor.detach()[:, -1].reshape(1, -1).double().cpu()

    logits = adapter.run_with_hooks(tokens, [(name, keep) for name in names])
    if logits is None or set(names) - set(acts):
        raise HookNotFiredError(f"The hooks {sorted(set(names) - set(acts))} did not fire.")
    post = acts[hooks.post_ffn_scale][:, 0] if hooks.post_ffn_scale is not None else None
    clean = CleanRuns(acts[hooks.coefficients], post, acts[readout.resid], acts[readout.norm_scale][:, 0])
    return logits[0, -1].double().log_softmax(-1).cpu(), clean


def ablate_one_by_one(
    adapter: MemoryAdapter,
    layer: int,
    prefixes: Sequence[Prefix],
    pair_prefix: Int[Tensor, " pairs"],
    pair_key: Int[Tensor, " pairs"],
    targets: Int[Tensor, "pairs targets"],
    *,
    frozen_from_contributions: bool = True,
) -> Ablations:
    """The reference of :func:`ablate`: per pair, a clean and an ablated forward pass of its prefix alone.

    The ablation is an :class:`~ffkv_lens.analysis.interventions.Edit` (``zero`` at the last
    position) under :func:`~ffkv_lens.analysis.interventions.intervene`, and log p comes from the
    model's own logits. With ``frozen_from_contributions`` the frozen direct effect is read from
    :func:`~ffkv_lens.analysis.contributions.contributions` (one more forward pass per target: for
    tests); without, it is derived from the clean pass as :func:`ablate` does (for benchmarks).
    """
    from ffkv_lens.analysis.contributions import contributions
    from ffkv_lens.analysis.interventions.edits import Edit, intervene

    check_causal(adapter)
    _check_pairs(len(prefixes), pair_prefix, pair_key, targets, adapter.d_mlp)
    start = time.perf_counter()
    out = {name: torch.zeros(targets.shape, dtype=torch.float64) for name in ("clean", "total", "direct", "frozen")}
    coefficient = torch.zeros(pair_prefix.numel(), dtype=torch.float64)
    for i, (p, key) in enumerate(zip(pair_prefix.tolist(), pair_key.tolist(), strict=True)):
        tokens = torch.tensor([prefixes[p]], device=adapter.device)
        with torch.no_grad():
            logp, clean = _clean_alone(adapter, layer, tokens)
            with intervene(adapter, [Edit.zero(layer, key, positions=(tokens.shape[1] - 1,))]):
                ablated = adapter.run_with_hooks(tokens, [])[0, -1].double().log_softmax(-1).cpu()
        out["clean"][i], out["total"][i] = logp[targets[i]], (logp - ablated)[targets[i]]
        coefficient[i], _, direct, frozen = _direct(
            adapter, layer, clean, torch.tensor([0]), pair_key[i : i + 1], targets[i : i + 1]
        )
        out["direct"][i], out["frozen"][i] = direct[0], frozen[0]
        for j, token in enumerate(targets[i].tolist() if frozen_from_contributions else []):
            table = contributions(adapter, tokens, position=-1, token=token, top=None, layers=[layer], top_tokens=0)
            out["frozen"][i, j] = float(table.loc[table.key == key, "contribution"].iloc[0])
    seconds = time.perf_counter() - start
    return Ablations(coefficient, out["clean"], out["total"], out["direct"], out["frozen"], seconds)
