"""A cheap identity for a loaded model, so caches (statistics, supernets, studies) are never reused across
models: below every room that caches something, so none of them imports another for it."""

from __future__ import annotations

import hashlib
import json

import torch


def model_fingerprint(model: torch.nn.Module) -> str:
    """Config plus every parameter's shape and a strided sample of its values: cheap, and tells models apart."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        digest.update(name.encode() + str(tuple(param.shape)).encode() + sample.numpy().tobytes())
    return digest.hexdigest()[:16]
