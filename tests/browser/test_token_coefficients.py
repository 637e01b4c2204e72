"""Per-token coefficients of the quantile samples, recomputed with the browser's model (``browse --model``)."""

import pytest
import torch

from ffkv_lens.browser import BrowserIndex
from ffkv_lens.browser.token_coefficients import sample_token_coefficients
from ffkv_lens.errors import ConfigError

RECOMPUTE_TOL = 1e-4  # float32 forward of the same tokens in another batch: only summation order differs


def test_recomputed_coefficients_match_the_recorded_ones_and_a_forward_of_each_prefix(
    tiny_index, tiny_atlas, tiny_prompt
) -> None:
    layer = tiny_atlas.layers[1]
    lens = tiny_prompt.lens
    bos = lens.adapter.bos_token_id
    alone: dict[tuple[int, int], torch.Tensor] = {}  # (unit, position) -> m of its prefix run alone, every key
    with BrowserIndex(tiny_index) as index:
        for key in range(0, tiny_atlas.d_mlp, 16):
            got = sample_token_coefficients(tiny_prompt, "run", index, layer, key)
            assert got["max_abs_difference"] <= RECOMPUTE_TOL
            samples = tiny_atlas.quantile_examples(layer, key)
            flat = [tokens for g in sorted(got["groups"], key=int) for tokens in got["groups"][g]]
            assert len(flat) == len(samples)
            for tokens, s in zip(flat, samples.itertuples(index=False), strict=True):
                ids = tiny_atlas.units.get(s.unit_id)[1][: s.position + 1]
                if not ids:  # a sample on the BOS
                    assert tokens == []
                    continue
                assert [t["token"] for t in tokens] == [tiny_atlas.tokenizer.decode([i]) for i in ids]
                if (s.unit_id, s.position) not in alone:
                    prefix = torch.tensor([([bos] if bos is not None else []) + ids])
                    m = lens.coefficients(prefix, layers=[layer])[layer][0, -len(ids) :].double()
                    alone[s.unit_id, s.position] = m
                recomputed = torch.tensor([t["coefficient"] for t in tokens], dtype=torch.float64)
                assert (recomputed - alone[s.unit_id, s.position][:, key]).abs().max() <= RECOMPUTE_TOL
                assert abs(recomputed[-1] - s.coefficient) <= RECOMPUTE_TOL


def test_per_token_coefficients_need_the_run_s_model(tiny_index, tiny_prompt) -> None:
    with BrowserIndex(tiny_index) as index:
        with pytest.raises(ConfigError, match="browse RUN_DIR --model"):
            sample_token_coefficients(None, "run", index, 0, 1)
        with pytest.raises(ConfigError, match="run 'run''s, not 'other'"):
            sample_token_coefficients(tiny_prompt, "other", index, 0, 1)
