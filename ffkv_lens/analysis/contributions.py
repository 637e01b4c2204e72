"""Which memories push a token at one position: per-memory direct logit attribution.

Memory ``i`` of layer ``l`` adds ``(m_i / s_post) * v_i`` to the residual stream at position
``t`` (``s_post``: Gemma's post-FFN norm scale at ``t``, else 1). Its direct effect on the logit
of token ``w``, through the final norm with its scale ``s_final`` frozen at ``t``, is

    contribution_i = (m_i / s_post) * value_logits(l)[i, w] / s_final

where ``value_logits`` is the direction-only value readout (final norm gain, centring on
LayerNorm models, ``W_U``, centred over the vocabulary; :meth:`MemoryAdapter.value_logits`).
Summed over a layer's memories this is the direct logit attribution of the layer's FFN output
without its bias, centred over the vocabulary and before any soft-cap: identical for processed
and raw weights and on every backend.

Example:
    >>> table = lens.contributions("The capital of France is", position=-1)  # doctest: +SKIP
    >>> table.head()  # doctest: +SKIP
"""

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from ffkv_lens.adapters import AdapterLike, MemoryAdapter, as_adapter
from ffkv_lens.errors import ConfigError, MissingActivationsError

__all__ = ["DEFINITION", "contributions"]

DEFINITION = (
    "contribution = (m_i / s_post) * value_logits[i, token] / s_final: the memory's direct effect on the "
    "token's logit (centred over the vocabulary, before any soft-cap) through the final norm with its "
    "scale s_final frozen at the position; s_post = post-FFN norm scale (Gemma), else 1"
)


def _is_cache(source: Any) -> bool:
    return isinstance(source, Mapping) or hasattr(source, "cache_dict")


def _from_cache(adapter: MemoryAdapter, cache: Any, names: Sequence[str]) -> dict[str, Tensor]:
    """The activations ``names`` from a cache keyed by canonical names or their aliases."""
    if getattr(cache, "model", None) is not None and not adapter.wraps(cache.model):
        raise ConfigError("The ActivationCache was made with another model than this lens's; pass a cache of it.")
    keys = set(cache.keys())
    found, missing = {}, []
    for name in names:
        hit = next((alias for alias in adapter.hook_aliases(name) if alias in keys), None)
        if hit is None:
            missing.append(name)
        else:
            tensor = cache[hit]
            found[name] = tensor if getattr(cache, "has_batch_dim", True) else tensor.unsqueeze(0)
    if missing:
        raise MissingActivationsError(
            f"The cache lacks the activations {missing}, which contributions() needs. Cache them too, e.g. "
            f"model.run_with_cache(tokens, names_filter=lambda name: name in {sorted(set(names))!r}), "
            "or pass the tokens instead of a cache."
        )
    return found


def _activations(adapter: MemoryAdapter, source: Any, names: Sequence[str]) -> dict[str, Tensor]:
    if _is_cache(source):
        return _from_cache(adapter, source, names)
    if isinstance(source, str):
        tokens = adapter.to_tokens(source)
    elif isinstance(source, Tensor) and source.dtype in (torch.int32, torch.int64) and source.ndim in (1, 2):
        tokens = source if source.ndim == 2 else source.unsqueeze(0)
    else:
        raise ConfigError(
            f"source is a {type(source).__name__}; pass text, token ids [pos] or [batch, pos], "
            "or an ActivationCache from model.run_with_cache."
        )
    return adapter.record(tokens.to(adapter.device), names)


def _token_id(adapter: MemoryAdapter, token: int | str) -> int:
    if isinstance(token, str):
        ids = adapter.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(f"token={token!r} is {len(ids)} tokens {ids}; pass one token (a string or an id).")
        return int(ids[0])
    if not isinstance(token, int) or not 0 <= token < adapter.d_vocab:
        raise ConfigError(f"token={token!r}; pass a token id in [0, {adapter.d_vocab}) or a one-token string.")
    return token


def _value_tokens(adapter: MemoryAdapter, layer: int, keys: list[int], k: int) -> list[list[str]]:
    if not keys or k == 0:
        return [[] for _ in keys]
    top = adapter.value_logits(layer, keys).topk(min(k, adapter.d_vocab), dim=-1).indices.tolist()
    return [adapter.tokenizer.batch_decode([[t] for t in row]) for row in top]


def contributions(
    model: AdapterLike,
    source: Any,
    *,
    position: int,
    token: int | str | None = None,
    top: int | None = 20,
    layers: int | Sequence[int] | None = None,
    batch: int = 0,
    top_tokens: int = 5,
) -> pd.DataFrame:
    """The memories that most push ``token`` at ``position`` (see the module docstring).

    Args:
        model: A :class:`ffkv_lens.MemoryLens` or its :class:`~ffkv_lens.adapters.MemoryAdapter`.
        source: Text, token ids (``[pos]`` or ``[batch, pos]``), or an ``ActivationCache`` (or a
            dict of activations) the user made with ``run_with_cache``: then no forward pass runs.
        position: Token position (negative counts from the end; BOS, when prepended, is 0).
        token: Token id or one-token string; default: the model's prediction at ``position``.
        top: Rows kept, largest contribution first; ``None`` keeps every memory of ``layers``.
        layers: Layers to attribute (default all).
        batch: Row of ``source`` to read when it holds several sequences.
        top_tokens: Top tokens listed per memory's value (``value_logits``).

    Returns:
        A DataFrame with columns ``layer, key, coefficient, contribution, value_top_tokens``;
        ``attrs`` holds ``settings`` (token, position, definition, model) and ``layer_totals``
        (each layer's sum over all its memories: its FFN's direct logit attribution without bias).

    Raises:
        ConfigError: For an invalid position, token, batch or source, or a post-LN encoder.
        MissingActivationsError: If a cache lacks needed hooks (they are named).
    """
    adapter = as_adapter(model)
    if adapter.spec.readout != "unembed":
        raise ConfigError(f"contributions() needs a decoder with an unembedding; {adapter.architecture} has not.")
    if top is not None and (not isinstance(top, int) or top < 1):
        raise ConfigError(f"top={top!r}; pass a positive integer or None (every memory).")
    chosen = adapter.check_layers(layers)
    layer_hooks = {layer: adapter.hook_names(layer) for layer in chosen}
    readout = adapter.readout_hooks()
    names = [h.coefficients for h in layer_hooks.values()] + [readout.norm_scale]
    names += [h.post_ffn_scale for h in layer_hooks.values() if h.post_ffn_scale is not None]
    names += [readout.resid] if token is None else []
    with torch.no_grad():
        acts = _activations(adapter, source, names)
        n_batch, n_pos = acts[readout.norm_scale].shape[:2]
        if not -n_batch <= batch < n_batch or not -n_pos <= position < n_pos:
            raise ConfigError(f"batch={batch}, position={position} is outside the source's {n_batch} x {n_pos} tokens.")
        pick = lambda name: acts[name][batch, position].to(adapter.device)  # noqa: E731
        token_id = (
            _token_id(adapter, token) if token is not None else int(adapter.readout(pick(readout.resid)).argmax())
        )
        s_final = pick(readout.norm_scale).reshape(())
        rows, totals = [], {}
        for layer, hooks in layer_hooks.items():
            m = pick(hooks.coefficients).float()
            scale = pick(hooks.post_ffn_scale).reshape(()) if hooks.post_ffn_scale is not None else 1.0
            contrib = (m / scale) * adapter.value_token_logits(layer, [token_id])[:, 0].float() / s_final
            contrib = contrib.double()  # float64 columns: the table's sums equal layer_totals
            totals[layer] = float(contrib.sum())
            rows.append(
                pd.DataFrame(
                    {
                        "layer": layer,
                        "key": range(len(m)),
                        "coefficient": m.cpu().numpy(),
                        "contribution": contrib.cpu().numpy(),
                    }
                )
            )
    table = pd.concat(rows, ignore_index=True).sort_values(
        ["contribution", "layer", "key"], ascending=[False, True, True]
    )
    table = (table if top is None else table.head(top)).reset_index(drop=True)
    table["value_top_tokens"] = _top_tokens_column(adapter, table, top_tokens)
    table.attrs["layer_totals"] = totals
    table.attrs["settings"] = {
        "token_id": token_id,
        "token": adapter.tokenizer.decode([token_id]),
        "token_is_prediction": token is None,
        "position": position,
        "batch": batch,
        "layers": chosen,
        "definition": DEFINITION,
        "value_readout_mode": adapter.value_readout_mode,
        "model": adapter.describe(),
    }
    return table


def _top_tokens_column(adapter: MemoryAdapter, table: pd.DataFrame, k: int) -> list[list[str]]:
    out: list[list[str]] = [[] for _ in range(len(table))]
    with torch.no_grad():
        for layer, group in table.groupby("layer", sort=False):
            for row, tokens in zip(
                group.index, _value_tokens(adapter, int(layer), group["key"].tolist(), k), strict=True
            ):
                out[row] = tokens
    return out
