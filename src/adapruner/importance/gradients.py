"""Gradient collection for Taylor metrics.

Only the weights of the prunable projections take gradients (embeddings, norms and lm_head are frozen),
so the backward pass stores no gradient for the largest matrices of small models.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .base import Statistics


def collect_gradients(
    model: torch.nn.Module, samples: torch.Tensor, module_names: list[str], batch_size: int = 10
) -> Statistics:
    """Gradient of the mean LM loss over ``samples`` w.r.t. each listed module's weight, in fp32."""
    wanted = {model.get_submodule(name).weight: name for name in module_names}
    previous = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(p in wanted)
    grads: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device
    try:
        batches = samples.split(batch_size)
        for batch in tqdm(batches, desc="gradients", disable=len(batches) < 2, leave=False):
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch).loss * (batch.shape[0] / samples.shape[0])
            loss.backward()
            for param, name in wanted.items():
                g = param.grad.detach().float()
                grads[name] = grads[name] + g if name in grads else g.clone()
                param.grad = None
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)
    return Statistics(grads=grads, num_samples=int(samples.shape[0]))
