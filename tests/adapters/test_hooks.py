"""ffkv_lens's hooks live alongside the user's, on both backends.

Documented order (docs/transformerlens.md): hooks the user registered before calling ffkv_lens
fire first, ffkv_lens's after them on the same hook point, so ffkv_lens sees the user's edits.
ffkv_lens's hooks are registered in a nested ``model.hooks()`` context and removed on exit,
after exceptions and KeyboardInterrupt too; the user's hooks (permanent, ``add_hook``ed, or from
an enclosing ``model.hooks()`` context) are never touched. Checked on the model's hook registry:
every HookPoint's PyTorch ``_forward_hooks`` and TransformerLens ``fwd_hooks`` handles.
"""

import pytest
import torch

from ffkv_lens import MemoryLens
from tests.conftest import has_hooked_transformer
from tests.helpers import assert_close

BACKENDS = ["bridge"] + (["hooked"] if has_hooked_transformer() else [])
FAMILIES = ["gpt2", "llama", "gemma3"]
TEXT = "The capital of France is Paris."


@pytest.fixture(params=[(b, f) for b in BACKENDS for f in FAMILIES], ids=lambda p: f"{p[0]}-{p[1]}")
def lens(request: pytest.FixtureRequest, tiny_bridge, tiny_hooked) -> MemoryLens:
    backend, family = request.param
    model = tiny_bridge(family) if backend == "bridge" else tiny_hooked(family, True)
    return MemoryLens(model)


def registry(model) -> dict[str, tuple]:
    """Every hook handle on every hook point (PyTorch's and TransformerLens's views)."""
    return {
        name: (tuple(point._forward_hooks), tuple(id(handle) for handle in point.fwd_hooks))
        for name, point in model.hook_dict.items()
    }


def _setup(lens: MemoryLens):
    model = lens.adapter.model
    tokens = lens.adapter.to_tokens(TEXT)
    with torch.no_grad():
        baseline = lens.coefficients(tokens, layers=1)[1]
    return model, tokens, baseline, lens.hook_names(1).coefficients


@torch.no_grad()
def test_user_hooks_fire_first_and_ffkv_sees_their_edits(lens: MemoryLens) -> None:
    model, tokens, baseline, name = _setup(lens)
    order, seen = [], {}
    original = registry(model)

    def user(tensor, hook):
        order.append("user")
        return tensor * 2

    def ours(tensor, hook):
        order.append("ffkv_lens")
        seen["m"] = tensor.detach()

    model.add_hook(name, user)
    try:
        with_user = registry(model)
        lens.adapter.run_with_hooks(tokens, [(name, ours)])
        assert order == ["user", "ffkv_lens"]
        assert_close(seen["m"], 2 * baseline, rel=1e-6, what="ffkv_lens sees the user's edit")
        assert_close(lens.coefficients(tokens, layers=1)[1], 2 * baseline, rel=1e-6, what="coefficients")
        assert registry(model) == with_user, "the user's hook must stay, ffkv_lens's must go"
    finally:
        model.reset_hooks()
    assert registry(model) == original


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt], ids=["exception", "interrupt"])
def test_no_hook_left_after_an_error(lens: MemoryLens, error: type[BaseException]) -> None:
    model, tokens, _, name = _setup(lens)
    model.add_hook(lens.hook_names(0).coefficients, lambda t, hook: None)  # a user hook that must survive
    try:
        before = registry(model)

        def boom(tensor, hook):
            raise error("stop here")

        with pytest.raises(error, match="stop here"):
            lens.adapter.run_with_hooks(tokens, [(lens.hook_names(0).coefficients, lambda t, hook: None), (name, boom)])
        assert registry(model) == before
        model.add_hook(name, boom)  # the error comes from the user's own hook during an ffkv_lens call
        with_boom = registry(model)
        with pytest.raises(error, match="stop here"):
            lens.coefficients(tokens, layers=[1, 2])
        assert registry(model) == with_boom
    finally:
        model.reset_hooks()


@torch.no_grad()
def test_works_inside_the_users_hooks_context(lens: MemoryLens) -> None:
    model, tokens, baseline, name = _setup(lens)
    original = registry(model)
    fired = []

    def user(tensor, hook):
        fired.append(hook.name)
        return tensor + 1

    with model.hooks(fwd_hooks=[(name, user)]):
        inside = registry(model)
        got = lens.coefficients(tokens, layers=1)[1]
        assert_close(got, baseline + 1, rel=1e-6, what="coefficients inside the user's context")
        assert registry(model) == inside, "the user's context hooks must survive an ffkv_lens call"
        model(tokens)
        assert len(fired) == 2, "the user's hook fires in ffkv_lens's pass and in the user's next pass"
    assert registry(model) == original
