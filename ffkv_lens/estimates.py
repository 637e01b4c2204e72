"""How long each step of a run will take, from its own size and rates measured on this machine.

Three rates are measured in a few seconds before the run starts: the forward pass (tokens/s, the
search's hooks included), the product with the unembedding (FLOP/s), and the corpus's sentence
splitting and tokenising (characters/s, on its first documents). Each step's size is then priced:

- triggers: the search's tokens, priced as forward pass plus splitting;
- values: ``2 n_layers d_mlp d_model d_vocab`` FLOP of products, times ``VALUE_PASSES``;
- dynamics: one pass over the corpus (splitting), ``positions`` prefixes (forward) and two readouts
  per position and layer (products, times ``READOUT_PASSES``);
- mutation: the distinct units among ``n_layers keys_per_layer examples`` trigger examples, each
  run about ``MUTATION_RUNS`` times (forward); trigger examples crowd into few units, so the
  distinct units are taken as ``min(units, MUTATION_SPREAD sqrt(examples units))`` of the ``units``
  searched;
- causal: ``n_layers causal_keys_per_layer causal_examples`` trigger prefixes (about half a unit long),
  each run about ``CAUSAL_RUNS`` times (forward: its clean pass, its memory's and its control's
  ablation) and read out ``CAUSAL_READOUTS`` times (products).

The two pass factors (the work on each logit besides the product: log-sum-exp, argmax, top-k,
rank counts) and ``MUTATION_SPREAD`` were fitted to `make demo` and to a run at the paper's sizes on the
project's 2-core CPU (docs/run.md compares estimates and step times); elsewhere it is a guide.
"""

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Rates", "describe_estimates", "measure_rates", "step_seconds"]

log = logging.getLogger(__name__)

VALUE_PASSES = 2.2
READOUT_PASSES = 1.5
MUTATION_RUNS = 4.4
MUTATION_SPREAD = 0.12
CAUSAL_RUNS = 3.0
CAUSAL_READOUTS = 6.0
_SAMPLE_CHARS = 50_000
_COUNT_SECONDS = 3.0


@dataclass(frozen=True)
class Rates:
    """Rates measured on this machine, and what is known of the corpus's size.

    Attributes:
        forward_tokens: Tokens per second of a forward pass (up to the last FFN).
        product_flops: FLOP per second of a product with the unembedding.
        split_chars: Characters per second of sentence splitting and tokenising.
        tokens_per_char: Tokens per character of the corpus's first documents.
        mean_unit_tokens: Mean length of those documents' units, in tokens.
        corpus_chars: Characters in the whole corpus (None: too large to count quickly).
    """

    forward_tokens: float
    product_flops: float
    split_chars: float
    tokens_per_char: float
    mean_unit_tokens: float
    corpus_chars: int | None


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return max(time.perf_counter() - start, 1e-6)


def _forward_rate(lens: Any, batch_tokens: int) -> float:
    tokens = torch.randint(0, lens.d_vocab, (max(1, batch_tokens // 128), 128), device=lens.adapter.device)
    lens.coefficients(tokens[:1, :16])  # warm-up
    return tokens.numel() / _timed(lambda: lens.coefficients(tokens))


def _product_rate(lens: Any) -> float:
    parts = lens.adapter.readout_parts()
    w_u = parts.unembedding if parts is not None else torch.randn(lens.d_model, 8192, device=lens.adapter.device)
    x = torch.randn(256, w_u.shape[0], dtype=w_u.dtype, device=w_u.device)
    x @ w_u  # warm-up
    return 2 * x.shape[0] * w_u.shape[0] * w_u.shape[1] / _timed(lambda: x @ w_u)


def _texts(corpus: Any) -> Iterator[tuple[int, str]]:
    for doc in corpus:
        yield doc.doc_id, doc.text


def _corpus_chars(corpus: Any) -> int | None:
    """Characters of the whole corpus, when one reading pass ends within a few seconds."""
    start, chars = time.perf_counter(), 0
    for _, text in _texts(corpus):
        chars += len(text)
        if time.perf_counter() - start > _COUNT_SECONDS:
            return None
    return chars


def measure_rates(lens: Any, corpus: Any, *, unit: str, max_len: int, batch_tokens: int) -> Rates:
    """Measure the rates of :class:`Rates` (a few seconds)."""
    from ffkv_lens.corpus import iter_units

    docs, chars = [], 0
    for doc_id, text in _texts(corpus):
        docs.append((doc_id, text[: _SAMPLE_CHARS - chars]))  # a huge document is sampled, not read whole
        chars += len(docs[-1][1])
        if chars >= _SAMPLE_CHARS:
            break
    start = time.perf_counter()
    lengths = [u.n_tokens for u in iter_units(docs, lens.adapter.tokenizer, unit=unit, max_len=max_len)]
    split_seconds = max(time.perf_counter() - start, 1e-6)
    return Rates(
        forward_tokens=_forward_rate(lens, batch_tokens),
        product_flops=_product_rate(lens),
        split_chars=max(chars, 1) / split_seconds,
        tokens_per_char=sum(lengths) / max(chars, 1),
        mean_unit_tokens=sum(lengths) / max(len(lengths), 1),
        corpus_chars=_corpus_chars(corpus),
    )


def step_seconds(rates: Rates, lens: Any, config: Any) -> dict[str, float | None]:
    """Estimated seconds of each step of a run of ``config`` (None where the corpus size is unknown)."""
    corpus_tokens = None if rates.corpus_chars is None else rates.corpus_chars * rates.tokens_per_char
    search_tokens = config.max_tokens if config.max_tokens is not None else corpus_tokens
    per_token = 1 / rates.forward_tokens + 1 / (rates.split_chars * rates.tokens_per_char)
    readout = 2 * lens.d_model * lens.d_vocab / rates.product_flops  # one state's logits
    corpus_pass = None if rates.corpus_chars is None else rates.corpus_chars / rates.split_chars
    prefix_tokens = config.positions * rates.mean_unit_tokens / 2
    values = lens.n_layers * lens.d_mlp * readout * VALUE_PASSES
    dynamics = config.positions * lens.n_layers * 2 * readout * READOUT_PASSES
    dynamics += prefix_tokens / rates.forward_tokens
    # The mutation test runs each distinct unit among its examples MUTATION_RUNS times. Trigger examples
    # crowd into few units: the distinct units grow like the square root of examples x units searched.
    units = (search_tokens or 0) / max(rates.mean_unit_tokens, 1.0)
    examples = lens.n_layers * config.keys_per_layer * config.examples
    distinct = min(units, MUTATION_SPREAD * (examples * units) ** 0.5)
    mutation_tokens = distinct * MUTATION_RUNS * rates.mean_unit_tokens
    prefixes = lens.n_layers * config.causal_keys_per_layer * config.causal_examples
    causal = prefixes * (CAUSAL_RUNS * rates.mean_unit_tokens / 2 / rates.forward_tokens + CAUSAL_READOUTS * readout)
    return {
        "triggers": None if search_tokens is None else search_tokens * per_token,
        "values": values,
        "dynamics": None if corpus_pass is None else dynamics + corpus_pass,
        "causal": causal,
        "mutation": mutation_tokens / rates.forward_tokens,
    }


def _minutes(seconds: float | None) -> str:
    return "unknown (corpus too large to size quickly)" if seconds is None else f"{seconds / 60:.1f} min"


def describe_estimates(lens: Any, corpus: Any, config: Any) -> list[str]:
    """One line of rates and one line per step, for the user before a run starts."""
    rates = measure_rates(lens, corpus, unit=config.unit, max_len=config.max_len, batch_tokens=config.batch_tokens)
    steps = step_seconds(rates, lens, config)
    known = [s for s in steps.values() if s is not None]
    lines = [
        f"measured: forward {rates.forward_tokens:,.0f} tokens/s, unembedding products "
        f"{rates.product_flops / 1e9:,.0f} GFLOP/s, sentence splitting {rates.split_chars / 1e3:,.0f}k chars/s",
        *(f"  {name:<9} about {_minutes(seconds)}" for name, seconds in steps.items()),
        f"estimated total: about {sum(known) / 60:.1f} min (agreement, figures and report take seconds)",
    ]
    log.info("estimates: %s", steps)
    return lines
