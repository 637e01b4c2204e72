"""Terminal rendering of prompt traces (``ffkv-lens trace``): the prediction and a per-layer table.

Example:
    >>> print(format_trace(lens.trace("The capital of France is")))  # doctest: +SKIP
"""

from typing import Any

__all__ = ["format_comparison", "format_trace"]


def _p(value: float) -> str:
    return f"{value:.4f}" if value >= 1e-4 else f"{value:.1e}"


def _memories(trace: Any, layer: int, n: int) -> str:
    rows = trace.memories[trace.memories.layer == layer].head(n)
    parts = [
        f"{int(r.key)} {r.contribution:+.3g} [{' '.join(map(repr, r.value_top_tokens[:3]))}]" for r in rows.itertuples()
    ]
    return "; ".join(parts)


def format_trace(trace: Any, *, memories: int = 3, next_tokens: int = 5) -> str:
    """The prediction, the top next tokens and one line per layer of a :class:`~ffkv_lens.analysis.interventions.Trace`.

    Each layer line: the readout's top token before and after the FFN with its probability, the
    probability of the final prediction before -> after the FFN, and the layer's top memories
    (key, contribution to the prediction, top value tokens).
    """
    pred = trace.prediction
    lines = [
        f"prompt: {''.join(trace.tokens)!r} ({len(trace.tokens)} tokens), position {trace.position} "
        f"({trace.tokens[trace.position]!r})",
        f"prediction: {pred!r} p={_p(trace.prob(trace.prediction_id))}",
        "next tokens: "
        + " | ".join(
            f"{t!r} {_p(p)}"
            for t, p in zip(trace.next_tokens.token[:next_tokens], trace.next_tokens.prob[:next_tokens], strict=True)
        ),
        f"{'layer':>5}  {'before FFN':<22} {'after FFN':<22} {'p(' + repr(pred) + ') before -> after':<28} "
        "top memories (key contribution [value tokens])",
    ]
    for row in trace.layers.itertuples():
        before = f"{row.top_before_ffn!r} {_p(row.p_top_before_ffn)}"
        after = f"{row.top_after_ffn!r} {_p(row.p_top_after_ffn)}"
        change = f"{_p(row.p_pred_before_ffn)} -> {_p(row.p_pred_after_ffn)}"
        lines.append(f"{row.layer:>5}  {before:<22} {after:<22} {change:<28} {_memories(trace, row.layer, memories)}")
    return "\n".join(lines)


def format_comparison(base: Any, edited: Any) -> str:
    """One line per changed quantity between a trace without and with edits (``base.diff(edited)``)."""
    diff = base.diff(edited)
    pred = base.prediction_id
    lines = [
        f"p({base.prediction!r}): {_p(base.prob(pred))} -> {_p(edited.prob(pred))} "
        f"({edited.prob(pred) - base.prob(pred):+.4f})",
        f"top token: {base.prediction!r} -> {edited.prediction!r} p={_p(edited.prob(edited.prediction_id))}",
        "largest changes: " + " | ".join(f"{r.token!r} {r.change:+.4f}" for r in diff.next_tokens.head(5).itertuples()),
    ]
    return "\n".join(lines)
