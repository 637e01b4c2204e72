"""Gate/up sign combinations of every memory's active positions (gated MLPs, ``quadrants=True``).

A gated memory's coefficient is ``m = act(g) * u`` with ``g`` the gate pre-activation (``mlp.hook_pre``)
and ``u`` the up projection (``mlp.hook_pre_linear``). For every memory and each of the four sign
combinations (``+`` is ``> 0``, ``-`` is ``<= 0``; order :data:`QUADRANTS`), the search counts the active
positions (``|m| > density_threshold``) and keeps the top examples by ``s * m``, with ``s`` the product of
the two signs (the sign ``m`` has there under SiLU and GELU), one per unit, as the top-k does (ties to
the lower unit id, then the first position). Both hooks fire before ``mlp.hook_post`` in the same
forward; their tensors are held only until the layer's coefficient hook has used them.
"""

from typing import Any

import torch
from torch import Tensor

from ffkv_lens.distributed import World
from ffkv_lens.errors import ConfigError
from ffkv_lens.kernels import TopKState, merge_states, update_topk

__all__ = ["QUADRANT_SIGNS", "QuadrantStats"]

QUADRANT_SIGNS = ((1, 1), (1, -1), (-1, 1), (-1, -1))
"""(gate sign, up sign) of each quadrant, in the order of ``QUADRANTS`` ("gate+ up+", "gate+ up-", ...)."""
_OUT = -3.0e38  # the value of positions outside a quadrant (finite, so the compiled top-k keeps its fast path)


class QuadrantStats:
    """Per layer: ``[d_mlp, 4]`` active counts and a top-k state per quadrant.

    Args:
        adapter: The model's adapter (gated, with ``gate_pre`` and ``up_pre`` hook names).
        layers: The searched layers.
        k: Examples kept per memory and quadrant.
        threshold: The density threshold.
        dtype: The search's coefficient dtype.
    """

    def __init__(self, adapter: Any, layers: list[int], k: int, threshold: float, dtype: torch.dtype) -> None:
        names = {layer: adapter.hook_names(layer) for layer in layers}
        if not adapter.gated or any(n.gate_pre is None or n.up_pre is None for n in names.values()):
            raise ConfigError(
                f"quadrants=True needs a gated MLP (gate and up projections); {adapter.model_name!r} is not gated. "
                "Pass quadrants=False, or search a gated model (e.g. smollm2-135m, gemma3-270m)."
            )
        dev, d_mlp = adapter.device, adapter.d_mlp
        self.threshold = threshold
        self.counts = {layer: torch.zeros(d_mlp, 4, dtype=torch.int64, device=dev) for layer in layers}
        self.tops = {layer: [TopKState.empty(d_mlp, k, dev, dtype) for _ in QUADRANT_SIGNS] for layer in layers}
        self._names = {n.gate_pre: (layer, 0) for layer, n in names.items()}
        self._names.update({n.up_pre: (layer, 1) for layer, n in names.items()})
        self._held: dict[tuple[int, int], Tensor] = {}

    def hooks(self) -> list[tuple[str, Any]]:
        """``(hook name, function)`` pairs that hold each layer's gate and up tensors for :meth:`update`."""

        def hold(tensor: Tensor, hook: Any) -> None:
            self._held[self._names[hook.name]] = tensor.detach()

        return [(name, hold) for name in self._names]

    def update(self, layer: int, m: Tensor, valid: Tensor, unit_ids: Tensor) -> None:
        """Count and rank one batch's active positions of ``layer`` by quadrant."""
        gate, up = self._held.pop((layer, 0)) > 0, self._held.pop((layer, 1)) > 0
        active = (m.abs() > self.threshold) & valid[..., None]
        for q, (gs, us) in enumerate(QUADRANT_SIGNS):
            inside = active & (gate if gs > 0 else ~gate) & (up if us > 0 else ~up)
            self.counts[layer][:, q] += inside.sum((0, 1))
            ranked = torch.where(inside, m * (gs * us), _OUT).to(m.dtype)
            self.tops[layer][q] = update_topk(self.tops[layer][q], ranked, valid, unit_ids)

    def referenced_units(self) -> Tensor:
        """Unit ids of every kept example (with duplicates)."""
        ids = [state.units.reshape(-1).cpu() for states in self.tops.values() for state in states]
        flat = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)
        return flat[flat >= 0]

    def tensors(self) -> dict[str, Tensor]:
        """``quadrants.<layer>.counts`` and ``quadrants.<layer>.<q>.<field>`` (for the checkpoint)."""
        out = {f"quadrants.{layer}.counts": c.contiguous().cpu() for layer, c in self.counts.items()}
        for layer, states in self.tops.items():
            for q, state in enumerate(states):
                out.update({f"quadrants.{layer}.{q}.{n}": getattr(state, n).contiguous().cpu() for n in state._fields})
        return out

    def restore(self, tensors: dict[str, Tensor], like: Any) -> None:
        """Take the state from a checkpoint's ``tensors`` (``like`` checks each)."""
        for layer, states in self.tops.items():
            self.counts[layer] = like(tensors, f"quadrants.{layer}.counts", self.counts[layer]).to(
                self.counts[layer].device
            )
            for q, state in enumerate(states):
                parts = [like(tensors, f"quadrants.{layer}.{q}.{n}", getattr(state, n)) for n in state._fields]
                states[q] = TopKState(
                    *(p.to(device=c.device, dtype=c.dtype) for p, c in zip(parts, state, strict=True))
                )

    def merge_world(self, here: World) -> None:
        """Sum the counts and merge the top-k states of every rank (rank order, exact)."""
        from ffkv_lens.distributed import all_gather_varlen, all_sum_

        if not here.distributed:
            return
        for layer, states in self.tops.items():
            all_sum_(self.counts[layer], here)
            for q, state in enumerate(states):
                gathered = [all_gather_varlen(t.reshape(-1), here) for t in state]
                merged = None
                for rank in range(here.size):
                    part = TopKState(*(g[rank].view(state.values.shape) for g in gathered))
                    merged = part if merged is None else merge_states(merged, part)
                states[q] = merged

    def finish(self, layer: int, shift: int) -> dict[str, Tensor]:
        """The stored fields of one layer: counts ``[d_mlp, 4]``, examples ``[d_mlp, 4, k]`` (coefficient m)."""
        states = self.tops[layer]
        values = torch.stack([s.values.cpu() for s in states], 1)
        units = torch.stack([s.units.cpu() for s in states], 1)
        positions = torch.stack([s.positions.cpu().long() for s in states], 1)
        kept = (units >= 0) & (values > _OUT / 2)
        signs = torch.tensor([gs * us for gs, us in QUADRANT_SIGNS], dtype=values.dtype)[None, :, None]
        return {
            "quadrant_counts": self.counts[layer].cpu(),
            "quadrant_units": torch.where(kept, units, -1),
            "quadrant_positions": torch.where(kept, positions - shift, -1),
            "quadrant_values": torch.where(kept, values * signs, 0),
        }
