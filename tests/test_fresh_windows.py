"""Fresh activation windows: source passes shared by mixes, bitwise equal to the unshared passes of prune."""

from __future__ import annotations

import torch

from adapruner.data import sample_mixture
from adapruner.importance import collect_statistics
from adapruner.importance.fresh import FreshWindows
from adapruner.models import get_adapter
from adapruner.models.loading import load_model
from conftest import write_corpus


def _setup(root):
    model, tokenizer = load_model(str(root / "tiny"))
    write_corpus(root / "other.txt", seed=1)
    modules = get_adapter(model).projection_names([0, 1])
    return model, tokenizer, modules, [str(root / "corpus.txt"), str(root / "other.txt")]


def _assert_equal(mine, theirs, modules) -> None:
    for m in modules:
        assert torch.equal(mine.act_sum[m], theirs.act_sum[m]) and torch.equal(mine.act_sq[m], theirs.act_sq[m])
    assert torch.equal(mine.tokens, theirs.tokens)


def test_mixes_reuse_the_passes_of_their_sources(tiny_model_dir):
    model, tokenizer, modules, (a, b) = _setup(tiny_model_dir)
    shared = FreshWindows(model, tokenizer, modules)
    shared.statistics(a, 64, 8, seed=0)
    assert shared.windows_run == 64
    mix = shared.statistics([a, b], 64, 8, seed=0)  # a's 32 windows start its 64: only b's 32 are run
    assert shared.windows_run == 96
    odd = shared.statistics([a, b], 43, 8, seed=0)  # 22 + 21: one whole batch each, then two short tails
    assert shared.windows_run == 96 + 6 + 5
    alone = FreshWindows(model, tokenizer, modules, reuse=False)
    _assert_equal(mix, alone.statistics([a, b], 64, 8, seed=0), modules)
    _assert_equal(odd, alone.statistics([a, b], 43, 8, seed=0), modules)
    again = shared.statistics([a, b], 43, 8, seed=0)
    assert shared.windows_run == 107 and torch.equal(again.tokens, odd.tokens)


def test_shared_passes_read_the_windows_of_the_mixture(tiny_model_dir):
    """The totals equal one pass over ``sample_mixture``'s windows (same windows, other batching)."""
    model, tokenizer, modules, sources = _setup(tiny_model_dir)
    mine = FreshWindows(model, tokenizer, modules).statistics(sources, 40, 8, seed=3)
    reference = collect_statistics(model, sample_mixture(tokenizer, sources, 40, 8, seed=3), modules, {"activations"})
    assert mine.tokens.sum() == reference.tokens.sum() == 40 * 8
    for m in modules:
        torch.testing.assert_close(mine.input_norm(m), reference.input_norm(m))
        torch.testing.assert_close(mine.input_mean(m), reference.input_mean(m))
    other_seed = FreshWindows(model, tokenizer, modules).statistics(sources, 40, 8, seed=4)
    assert not torch.allclose(other_seed.input_mean(modules[0]), mine.input_mean(modules[0]))
