"""The search objective: several sources in equal shares per chunk, perplexity or KL from the dense model."""

from __future__ import annotations

import json

import pytest
import torch

from adapruner import AdaPrunerError
from adapruner.evaluation.divergence import dense_reference, windowed_kl
from adapruner.search import SearchSpace, search
from adapruner.search.objective import interleaved
from conftest import make_tiny

WINDOWS = torch.randint(0, 97, (6, 12), generator=torch.Generator().manual_seed(5))


def _kl(model, reference) -> float:
    total, count = 0.0, 0
    for loss, n in windowed_kl(model, WINDOWS, reference, batch_size=4):
        total, count = total + loss, count + n
    return total / count


def test_kl_is_zero_for_the_dense_model_exact_with_the_whole_vocabulary_and_a_lower_bound_with_top_k():
    dense, other = make_tiny("llama-gqa"), make_tiny("llama-gqa", seed=1)
    vocab = dense.config.vocab_size
    full = dense_reference(dense, WINDOWS, k=vocab)
    assert _kl(dense, full) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        log_p = torch.log_softmax(dense(WINDOWS).logits[:, :-1], -1)
        log_q = torch.log_softmax(other(WINDOWS).logits[:, :-1], -1)
    exact = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    assert _kl(other, full) == pytest.approx(exact, rel=1e-4)
    top = _kl(other, dense_reference(dense, WINDOWS, k=8))
    assert 0.0 < top <= exact + 1e-6


def test_objective_chunks_hold_every_source_in_equal_shares():
    a, b = torch.zeros(5, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)
    mixed = interleaved([a, b])
    assert mixed.shape == (6, 4) and mixed[:, 0].tolist() == [0, 1, 0, 1, 0, 1]
    for chunk in mixed.tensor_split(3):
        assert chunk[:, 0].tolist() == [0, 1]


def test_search_with_the_kl_objective_on_two_sources(tiny_model_dir):
    from conftest import write_corpus

    root = tiny_model_dir
    other = root / "other.txt"
    write_corpus(other, seed=7)
    corpus = str(root / "corpus.txt")
    space = SearchSpace(sources=[corpus], num_samples=[4, 10], metrics=["element1", "l2"], warm_starts=[])
    kwargs = {"pool_per_source": 10, "objective_tokens": 256, "objective_seq_len": 16, "layers": "1:3"}
    result = search(
        str(root / "tiny"),
        0.15,
        trials=3,
        output=root / "run",
        space=space,
        objective_data=f"{corpus},{other}",
        objective="kl",
        **kwargs,
    )
    best = json.loads((root / "run" / "best.json").read_text())
    assert best["objective"].startswith("validation kl") and "other.txt" in best["objective"]
    assert 0.0 < result["best"]["value"] <= result["baseline"]["value"] < 20  # nats per token, not a perplexity
    with pytest.raises(AdaPrunerError, match=r"another setting.*objective"):  # a study of another objective
        search(str(root / "tiny"), 0.15, trials=4, output=root / "run", space=space, objective_data=corpus, **kwargs)
    with pytest.raises(AdaPrunerError, match="unknown --objective 'nll'"):
        search(str(root / "tiny"), 0.15, trials=4, output=root / "new", space=space, objective="nll", **kwargs)
    assert not (root / "new").exists()
