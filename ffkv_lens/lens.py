"""``MemoryLens``: the public face of ffkv_lens on one model.

Example:
    >>> import ffkv_lens as fk
    >>> lens = fk.MemoryLens(fk.load_model("smollm2-135m"))  # doctest: +SKIP
    >>> lens.n_layers, lens.d_mlp, lens.gated  # doctest: +SKIP
    (30, 1536, True)
"""

import contextlib
from collections.abc import Sequence
from typing import Any

from jaxtyping import Float
from torch import Tensor

from ffkv_lens.adapters import LayerHooks, MemoryAdapter, make_adapter
from ffkv_lens.adapters.base import FwdHook
from ffkv_lens.analysis.atlas import TriggerAtlas
from ffkv_lens.analysis.search_config import BATCH_TOKENS, CHECKPOINT_EVERY, SEARCH_DEFAULTS
from ffkv_lens.analysis.stats.settings import STATS_DEFAULTS
from ffkv_lens.analysis.values import ValueProjection
from ffkv_lens.corpus import Corpus, UnitKind
from ffkv_lens.types import AttentionMask, Coefficients, Keys, Logits, MemoryLogits, Residual, Tokens, ValueBias, Values

__all__ = ["MemoryLens"]


class MemoryLens:
    """Every FFN layer of a model read as a bank of key-value memories.

    Args:
        model: A ``TransformerBridge`` (TransformerLens 4.x), a ``HookedTransformer``
            (TransformerLens 3.x) or a :class:`MemoryAdapter`.

    Attributes:
        adapter: The backend- and family-specific adapter behind this lens.
    """

    def __init__(self, model: Any) -> None:
        self.adapter: MemoryAdapter = make_adapter(model)

    def __repr__(self) -> str:
        return (
            f"MemoryLens(architecture={self.architecture!r}, n_layers={self.n_layers}, "
            f"d_model={self.d_model}, d_mlp={self.d_mlp}, d_vocab={self.d_vocab}, gated={self.gated})"
        )

    # -- layout ------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Number of FFN layers."""
        return self.adapter.n_layers

    @property
    def d_model(self) -> int:
        """Residual stream width."""
        return self.adapter.d_model

    @property
    def d_mlp(self) -> int:
        """Memories per layer."""
        return self.adapter.d_mlp

    @property
    def d_vocab(self) -> int:
        """Vocabulary size."""
        return self.adapter.d_vocab

    @property
    def architecture(self) -> str:
        """Family name, e.g. ``"llama"``."""
        return self.adapter.architecture

    @property
    def gated(self) -> bool:
        """Whether each memory has a gate key and an up key."""
        return self.adapter.gated

    # -- memories ----------------------------------------------------------------------------
    def keys(self, layer: int) -> Keys:
        """Keys of ``layer`` (gate keys on gated MLPs), ``[d_mlp, d_model]``."""
        return self.adapter.keys(layer)

    def up_keys(self, layer: int) -> Keys | None:
        """Up keys of a gated ``layer``, else ``None``."""
        return self.adapter.up_keys(layer)

    def values(self, layer: int) -> Values:
        """Values of ``layer``: what each memory writes to the residual, ``[d_mlp, d_model]``."""
        return self.adapter.values(layer)

    def value_bias(self, layer: int) -> ValueBias | None:
        """The FFN output bias of ``layer``, or ``None``."""
        return self.adapter.value_bias(layer)

    def coefficients(
        self,
        tokens: Tokens,
        *,
        layers: int | Sequence[int] | None = None,
        attention_mask: AttentionMask | None = None,
    ) -> dict[int, Coefficients]:
        """Memory coefficients at ``mlp.hook_post``; the forward stops after the last layer asked."""
        return self.adapter.coefficients(tokens, layers=layers, attention_mask=attention_mask)

    def search_triggers(
        self,
        corpus: Corpus,
        *,
        k: int = SEARCH_DEFAULTS.k,
        unit: UnitKind = SEARCH_DEFAULTS.unit,
        max_len: int = SEARCH_DEFAULTS.max_len,
        layers: int | Sequence[int] | None = None,
        signed: bool = SEARCH_DEFAULTS.signed,
        exclude_bos: bool = SEARCH_DEFAULTS.exclude_bos,
        max_tokens: int | None = SEARCH_DEFAULTS.max_tokens,
        batch_tokens: int = BATCH_TOKENS,
        device: str | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = CHECKPOINT_EVERY,
        progress: bool = True,
        stats: bool = STATS_DEFAULTS.stats,
        density_threshold: float = STATS_DEFAULTS.density_threshold,
        histogram_bins: int = STATS_DEFAULTS.histogram_bins,
        quantile_groups: int = STATS_DEFAULTS.quantile_groups,
        quantile_samples: int = STATS_DEFAULTS.quantile_samples,
        quadrants: bool = STATS_DEFAULTS.quadrants,
    ) -> TriggerAtlas:
        """Top-k trigger examples of every key over a corpus (the paper's section 3).

        For each layer and key, the ``k`` units with the highest maximum coefficient (one example
        per unit) and the peak position; ``signed=True`` also keeps the ``k`` most negative.
        Exact: ties go to the lower unit id, and the result does not depend on ``batch_tokens``.

        Args:
            corpus: A :class:`ffkv_lens.Corpus`.
            k: Examples per key (and per sign).
            unit: ``"sentence"`` (the paper's), ``"document"`` (windowed at ``max_len``) or ``"window"``.
            max_len: Longest unit in tokens, without BOS.
            layers: Layers to search (default all); the forward stops after the last one.
            signed: Also keep the bottom-k (gated MLPs have signed coefficients).
            exclude_bos: Never count the BOS position as a peak (it dominates on modern models).
            max_tokens: Stop after this many unit tokens.
            batch_tokens: Padded tokens per forward pass (speed and memory only).
            device: Must be the model's device if given (the search runs where the model is).
            checkpoint_dir: Save state there every ``checkpoint_every`` tokens and resume from it.
            checkpoint_every: Tokens between checkpoints.
            progress: Show a progress bar.
            stats: Also gather per-memory statistics in the same pass (count, mean, std, density,
                histogram, quantile samples; docs/triggers.md "Per-memory statistics").
            density_threshold: ``|m| > density_threshold`` counts a position as active.
            histogram_bins: Uniform histogram bins per layer.
            quantile_groups: Activation intervals per memory with sampled examples.
            quantile_samples: Examples sampled per interval.
            quadrants: Count gate/up sign combinations of active positions (gated MLPs).

        Returns:
            A :class:`ffkv_lens.TriggerAtlas`.

        Example:
            >>> atlas = lens.search_triggers(fk.Corpus.default(), max_tokens=20_000)  # doctest: +SKIP
            >>> atlas.examples(layer=3, key=7)[0].prefix  # doctest: +SKIP
        """
        from ffkv_lens.analysis.triggers import search_triggers

        return search_triggers(
            self,
            corpus,
            k=k,
            unit=unit,
            max_len=max_len,
            layers=None if layers is None else ([layers] if isinstance(layers, int) else list(layers)),
            signed=signed,
            exclude_bos=exclude_bos,
            max_tokens=max_tokens,
            batch_tokens=batch_tokens,
            device=device,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            progress=progress,
            stats=stats,
            density_threshold=density_threshold,
            histogram_bins=histogram_bins,
            quantile_groups=quantile_groups,
            quantile_samples=quantile_samples,
            quadrants=quadrants,
        )

    def project_values(self, *, top_k: int = 10, layers: int | Sequence[int] | None = None) -> ValueProjection:
        """Top-k and bottom-k tokens of every value in vocabulary space (chunked; docs/values.md).

        Example:
            >>> proj = lens.project_values(top_k=10)  # doctest: +SKIP
            >>> proj.to_pandas(layers=[29]).head()  # doctest: +SKIP
        """
        from ffkv_lens.analysis.values import project_values

        return project_values(self, top_k=top_k, layers=layers)

    def contributions(
        self,
        source: Any,
        *,
        position: int,
        token: int | str | None = None,
        top: int | None = 20,
        layers: int | Sequence[int] | None = None,
        batch: int = 0,
        top_tokens: int = 5,
    ) -> Any:
        """The memories that most push ``token`` (default: the prediction) at ``position``.

        ``contribution = (m_i / s_post) * value_logits[i, token] / s_final``: coefficient times the
        value's direction-only logit of the token, through the final norm's scale at the position
        (and Gemma's post-FFN norm scale). A layer's contributions sum to the direct logit
        attribution of its FFN output without bias (centred over the vocabulary, before any
        soft-cap); ``attrs["layer_totals"]`` holds those sums. See
        :func:`ffkv_lens.analysis.contributions.contributions` and docs/transformerlens.md.

        Args:
            source: Text, token ids, or an ``ActivationCache`` from ``model.run_with_cache``
                (then no forward pass runs; missing hooks are named in the error).
            position: Token position (negative from the end).
            token: Token id or one-token string (default: the model's prediction there).
            top: Rows kept, largest contribution first (``None``: every memory).
            layers: Layers to attribute (default all).
            batch: Row of ``source`` when it holds several sequences.
            top_tokens: Top value tokens listed per memory (0: none, faster with ``top=None``).

        Returns:
            A DataFrame ``layer, key, coefficient, contribution, value_top_tokens``.

        Example:
            >>> lens.contributions("The capital of France is", position=-1, top=5)  # doctest: +SKIP
        """
        from ffkv_lens.analysis.contributions import contributions

        return contributions(
            self, source, position=position, token=token, top=top, layers=layers, batch=batch, top_tokens=top_tokens
        )

    # -- interventions (docs/interventions.md) -------------------------------------------------
    def intervene(self, edits: Any) -> contextlib.AbstractContextManager[None]:
        """Context in which every forward pass of the model runs under ``edits`` (:class:`ffkv_lens.Edit`).

        Example:
            >>> with lens.intervene([fk.Edit.zero(20, [7, 9])]):  # doctest: +SKIP
            ...     logits = model(tokens)
        """
        from ffkv_lens.analysis.interventions import intervene

        return intervene(self.adapter, edits)

    def edit_hooks(self, edits: Any) -> list[FwdHook]:
        """``(hook_name, fn)`` pairs applying ``edits``, for ``model.run_with_hooks`` or ``model.hooks``."""
        from ffkv_lens.analysis.interventions import edit_hooks

        return edit_hooks(self.adapter, edits)

    def trace(self, source: Any, *, position: int = -1, top: int = 10, edits: Any = None, top_tokens: int = 5) -> Any:
        """Next tokens, per-layer readouts and top memories of a prompt, optionally under ``edits``.

        Returns a :class:`ffkv_lens.analysis.interventions.Trace`; ``base.diff(edited)`` compares two.

        Example:
            >>> lens.trace("The capital of France is", edits=[fk.Edit.zero(20, 7)]).next_tokens  # doctest: +SKIP
        """
        from ffkv_lens.analysis.interventions import trace

        return trace(self.adapter, source, position=position, top=top, edits=edits, top_tokens=top_tokens)

    def generate(
        self, text: str, *, max_new_tokens: int = 20, edits: Any = None, temperature: float = 0.0, seed: int = 0
    ) -> str:
        """The continuation of ``text`` under ``edits`` (greedy by default, seeded sampling, stops at EOS)."""
        from ffkv_lens.analysis.interventions import generate

        return generate(
            self.adapter, text, max_new_tokens=max_new_tokens, edits=edits, temperature=temperature, seed=seed
        )

    def compare_generation(
        self, text: str, edits: Any, *, max_new_tokens: int = 20, temperature: float = 0.0, seed: int = 0
    ) -> Any:
        """The continuation of ``text`` without and with ``edits`` (a ``GenerationComparison``)."""
        from ffkv_lens.analysis.interventions import compare_generation

        return compare_generation(
            self.adapter, text, edits, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        )

    def edited_values(self, edits: Any) -> contextlib.AbstractContextManager[None]:
        """Context in which ``zero``/``scale`` edits are applied to ``W_out`` itself, restored exactly on exit."""
        from ffkv_lens.analysis.interventions import edited_values

        return edited_values(self.adapter, edits)

    def hook_names(self, layer: int) -> LayerHooks:
        """Canonical hook names of ``layer`` used by the analyses."""
        return self.adapter.hook_names(layer)

    # -- vocabulary ----------------------------------------------------------------------------
    def readout(self, resid: Residual) -> Logits:
        """Logits of full residual states (final norm, unembedding, soft-cap)."""
        return self.adapter.readout(resid)

    def value_logits(self, layer: int, memories: Tensor | Sequence[int] | None = None) -> MemoryLogits:
        """Direction-only projection of values into the vocabulary (mode: ``value_readout_mode``)."""
        return self.adapter.value_logits(layer, memories)

    @property
    def value_readout_mode(self) -> str:
        """Definition of :meth:`value_logits`, recorded with every result."""
        return self.adapter.value_readout_mode

    def ffn_output(
        self,
        layer: int,
        coefficients: Float[Tensor, "*batch d_mlp"],
        post_scale: Float[Tensor, "*batch 1"] | None = None,
    ) -> Float[Tensor, "*batch d_model"]:
        """Rebuild what the FFN adds to the residual from coefficients (see the adapter)."""
        return self.adapter.ffn_output(layer, coefficients, post_scale)
