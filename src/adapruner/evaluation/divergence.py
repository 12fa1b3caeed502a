"""KL divergence of a pruned model's next-token distribution from the dense model's, on fixed windows.

The dense distribution is kept as its top ``k`` log-probabilities per position plus the log of the
mass left over (a few MB instead of vocabulary × tokens floats); the divergence is computed on those
``k + 1`` bins: ``Σ_top p (log p − log q) + p_rest (log p_rest − log q_rest)``, which never exceeds the
full KL (the bins coarsen the rest of the vocabulary) and equals it when the top k hold all the mass.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

TOP_K = 64


@dataclass
class DenseReference:
    """The dense model's top-k next-token log-probabilities on ``windows`` [N, L] (positions 0..L-2)."""

    log_probs: torch.Tensor  # [N, L-1, k]
    indices: torch.Tensor  # [N, L-1, k]
    log_rest: torch.Tensor  # [N, L-1]: log of the probability outside the top k

    def split(self, sections: int) -> list[DenseReference]:
        parts = zip(
            self.log_probs.tensor_split(sections),
            self.indices.tensor_split(sections),
            self.log_rest.tensor_split(sections),
            strict=True,
        )
        return [DenseReference(*p) for p in parts]


def _log_rest(top: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ exp(top)), stable when the top k hold almost all of the mass."""
    return torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))


@torch.no_grad()
def dense_reference(model: torch.nn.Module, windows: torch.Tensor, k: int = TOP_K, batch_size: int = 8):
    """Run the dense model once over ``windows`` and keep what the KL needs."""
    device = next(model.parameters()).device
    probs, indices, rest = [], [], []
    for batch in windows.split(batch_size):
        log_p = torch.log_softmax(model(input_ids=batch.to(device)).logits[:, :-1].float(), -1)
        top = log_p.topk(k, dim=-1)
        probs.append(top.values.cpu())
        indices.append(top.indices.cpu())
        rest.append(_log_rest(top.values).cpu())
    return DenseReference(torch.cat(probs), torch.cat(indices), torch.cat(rest))


@torch.no_grad()
def windowed_kl(
    model: torch.nn.Module, windows: torch.Tensor, reference: DenseReference, batch_size: int = 8
) -> Iterator[tuple[float, int]]:
    """(summed KL(dense ‖ model), positions) per batch of windows, so callers can stop early."""
    device = next(model.parameters()).device
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        log_q = torch.log_softmax(model(input_ids=batch).logits[:, :-1].float(), -1).cpu()
        log_p = reference.log_probs[start : start + batch_size]
        top_q = log_q.gather(-1, reference.indices[start : start + batch_size])
        rest_p = reference.log_rest[start : start + batch_size]
        kl = (log_p.exp() * (log_p - top_q)).sum(-1) + rest_p.exp() * (rest_p - _log_rest(top_q))
        yield float(kl.sum()), kl.numel()


__all__ = ["TOP_K", "DenseReference", "dense_reference", "windowed_kl"]
